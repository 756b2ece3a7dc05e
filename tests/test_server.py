"""`simplegpt serve`: a real server process on 127.0.0.1, OpenAI's official client, a real browser."""

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import make_tiny_gpt
from simplegpt import get_tokenizer, load_checkpoint, save_checkpoint
from simplegpt.engine import Engine, SamplingParams

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from simplegpt.serve import CHAT_STOP, ChatMessage, chat_prompt  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tok = get_tokenizer("byte")
    model = make_tiny_gpt(seed=0, scale=4.0, vocab_size=tok.vocab_size, n_positions=48)  # scale: varied text
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", model, tok)


def start(checkpoint: Path, *extra: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """A `simplegpt serve` process and its port; its later stderr lines (the access log) are read
    into proc.log, so that the pipe never fills."""
    proc = subprocess.Popen([sys.executable, "-m", "simplegpt", "serve", "--checkpoint", str(checkpoint),
                             "--port", "0", *extra], stderr=subprocess.PIPE, text=True,
                            env=None if env is None else {**os.environ, **env})
    line = proc.stderr.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not found:
        proc.kill()
        raise AssertionError(f"no address in the server's first line: {line!r} {proc.stderr.read()}")
    proc.log = []
    threading.Thread(target=lambda: proc.log.extend(proc.stderr), daemon=True).start()
    port = int(found.group(1))
    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json() == {"status": "ok"}:
                return proc, port
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("the server did not answer /health")


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, port = start(checkpoint)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def engine(checkpoint) -> Engine:
    ck = load_checkpoint(checkpoint)
    return Engine(ck.model, ck.tokenizer)


def expected(engine: Engine, prompts, **kw) -> list[str]:
    return [r.text for r in engine.generate(prompts, SamplingParams(**kw))]


def test_models_and_greedy_completion_equal_the_engine(client, engine):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    out = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=30, temperature=0)
    [want] = expected(engine, ["ROMEO:"], max_new_tokens=30, temperature=0)
    assert out.choices[0].text == want and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len("ROMEO:") and out.usage.completion_tokens == 30
    echo = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=30, temperature=0, echo=True)
    assert echo.choices[0].text == "ROMEO:" + want
    ids = client.completions.create(model="tiny", prompt=list(b"ROMEO:"), max_tokens=30, temperature=0)
    assert ids.choices[0].text == want  # token ids (bytes here) as the prompt
    # OpenAI's default is 16 tokens; top_k = 1 (simplegpt's own, through extra_body) is greedy
    short = client.completions.create(model="tiny", prompt="ROMEO:", temperature=1.0, extra_body={"top_k": 1})
    assert short.usage.completion_tokens == 16 and short.choices[0].text == want[: len(short.choices[0].text)]


def test_streaming_concatenates_to_the_full_text(client, engine):
    [want] = expected(engine, ["JULIET:"], max_new_tokens=60, temperature=0)  # past the 48-token window
    chunks = list(client.completions.create(model="tiny", prompt="JULIET:", max_tokens=60, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want and len(chunks) > 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 60


def test_seeds_batches_and_stop_strings(client, engine):
    kw = dict(max_new_tokens=25, temperature=0.9, seed=7)
    want = expected(engine, ["A", "A", "Bee", "Bee"], **kw)
    out = client.completions.create(model="tiny", prompt=["A", "Bee"], n=2, max_tokens=25, temperature=0.9, seed=7)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == want
    again = client.completions.create(model="tiny", prompt="A", max_tokens=25, temperature=0.9, seed=7)
    other = client.completions.create(model="tiny", prompt="A", max_tokens=25, temperature=0.9, seed=8)
    assert again.choices[0].text == want[0] != other.choices[0].text
    streamed = client.completions.create(model="tiny", prompt=["A", "Bee"], n=2, max_tokens=25, temperature=0.9,
                                         seed=7, stream=True)
    texts = ["", "", "", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == want
    [full] = expected(engine, ["ROMEO:"], max_new_tokens=30, temperature=0)
    stop = full[10:13]
    cut = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=30, temperature=0, stop=["qqq", stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_logprobs_are_the_engines(client, engine, server):
    params = SamplingParams(max_new_tokens=12, temperature=0.7, seed=5, logprobs=3)
    [want] = engine.generate(["ROMEO:"], params)
    out = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=0.7, seed=5, logprobs=3)
    lp = out.choices[0].logprobs
    # each token as text: a byte here, escaped where it is no whole UTF-8 character
    tokens = [bytes([t]).decode("utf-8", errors="backslashreplace") for t in want.token_ids]
    assert out.choices[0].text == want.text and lp.tokens == tokens
    assert lp.token_logprobs == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    assert [list(top.values()) for top in lp.top_logprobs] == [
        pytest.approx([v for _, v in t.top], abs=1e-5) for t in want.logprobs]
    assert_offsets_index(out.choices[0].text, lp.tokens, lp.text_offset)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    # the tokens of the message: those of the space removed before it or of a stop string are left out
    assert bytes(b for c in content for b in c.bytes).decode("utf-8", "replace") == chat.choices[0].message.content
    assert len(content) <= chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)  # greedy
    assert all(len(c.bytes) == 1 and c.token == bytes(c.bytes).decode("utf-8", "backslashreplace") for c in content)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="tiny", prompt="A", logprobs=6)
    # echo + logprobs: the prompt's tokens first (the first without a log-probability), as engine.score gives
    # them; max_tokens 0 scores the prompt alone (how evaluation harnesses ask for a text's log-likelihood)
    [(ids, scored)] = engine.score(["ROMEO:"], top=2)
    both = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=0.7, seed=5,
                                     logprobs=2, echo=True)
    lp = both.choices[0].logprobs
    assert both.choices[0].text == "ROMEO:" + want.text and len(lp.tokens) == 6 + 12
    assert "".join(lp.tokens[:6]) == "ROMEO:" and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:6] == pytest.approx([t.logprob for t in scored], abs=1e-5)
    assert lp.token_logprobs[6:] == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    assert lp.text_offset[6] == 6
    only = client.completions.create(model="tiny", prompt=[list(b"ROMEO:"), list(b"JULIET")], max_tokens=0,
                                     echo=True, logprobs=0)
    assert [c.text for c in only.choices] == ["ROMEO:", "JULIET"] and only.usage.completion_tokens == 0
    assert only.choices[0].logprobs.token_logprobs[1:] == pytest.approx([t.logprob for t in scored], abs=1e-5)
    assert only.usage.prompt_tokens == 12 and only.choices[0].finish_reason == "length"
    for kw in (dict(max_tokens=0), dict(max_tokens=0, echo=True, stream=True)):
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.completions.create(model="tiny", prompt="A", **kw)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], top_logprobs=2)


def test_logprobs_in_streams_with_echo_and_offsets_that_index_the_text(client, engine):
    params = SamplingParams(max_new_tokens=40, temperature=0.9, seed=3, logprobs=2)
    [want] = engine.generate(["ROMEO:"], params)
    plain = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=40, temperature=0.9, seed=3, logprobs=2)
    chunks = [c.choices[0] for c in client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=40,
                                                               temperature=0.9, seed=3, logprobs=2, stream=True)]
    text = "".join(c.text for c in chunks)
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    lps = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert text == want.text == plain.choices[0].text and tokens == plain.choices[0].logprobs.tokens
    assert lps == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    assert offsets == plain.choices[0].logprobs.text_offset
    assert_offsets_index(text, tokens, offsets)
    chat = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=12, temperature=0,
                logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**chat).choices[0].logprobs.content
    parts = [e for c in client.chat.completions.create(**chat, stream=True) if c.choices and c.choices[0].logprobs
             for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in parts] == [(e.token, e.logprob) for e in whole] and len(whole) == 12
    # echo scores the prompt whatever logprobs asks, 0 included; a prompt starting with an emoji (4 byte
    # tokens here) and an empty prompt (the EOS token, which its text does not show) index their text
    for prompt in ("\N{GRINNING FACE} ROMEO:", ""):
        [(ids, scored)] = engine.score([prompt], top=0)
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, echo=True,
                                        logprobs=0).choices[0]
        lp = out.logprobs
        assert lp.token_logprobs[1:len(ids)] == pytest.approx([t.logprob for t in scored], abs=1e-5)
        assert len(lp.tokens) == len(ids) + 5 and out.text.startswith(prompt)
        assert_offsets_index(out.text, lp.tokens, lp.text_offset)
        assert lp.text_offset[len(ids)] == len(prompt)  # the first generated token starts after the prompt
    assert lp.text_offset[:1] == [0]


def assert_offsets_index(text: str, tokens: list[str], offsets: list[int]) -> None:
    """text_offset indexes the returned text: from 0, never backwards, never past its end, and a
    token that is one ASCII character is that character of the text (a character split across
    tokens, escaped as \\xNN in `tokens`, gives each of them its index)."""
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(text)
    assert all(text[o] == t for o, t in zip(offsets, tokens) if len(t) == 1 and t.isascii())


def test_chat_through_the_template(client, engine):
    messages = [{"role": "system", "content": "A play."}, {"role": "user", "content": "Who goes there?"}]
    prompt = chat_prompt([ChatMessage(**m) for m in messages])
    assert prompt == "A play.\n\nUser: Who goes there?\nAssistant:"
    [want] = expected(engine, [prompt], max_new_tokens=40, temperature=0, stop=[CHAT_STOP])
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want.lstrip()
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.lstrip()
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_bad_requests_get_openai_errors(client, server):
    bad = [dict(temperature=3.0), dict(max_tokens=0), dict(top_p=0.0), dict(n=0), dict(logprobs=-1),
           dict(presence_penalty=0.5), dict(stop=["a", "b", "c", "d", "e"]), dict(extra_body={"top_k": -1}),
           dict(extra_body={"nonsense": 1})]
    for kw in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="A", **kw)
        assert e.value.status_code == 400 and e.value.body["message"], kw
    with pytest.raises(openai.BadRequestError, match="between 1 and 4096"):
        client.completions.create(model="tiny", prompt="A", max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        client.completions.create(model="tiny", prompt=["A"] * 5, n=16)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="out of range"):
            client.completions.create(model="tiny", prompt=[65, 999], stream=stream)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="A")
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    r = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # null means "the default", as clients that send every option they know of expect
    r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "A", "temperature": None,
                                                     "max_tokens": None, "logprobs": None, "stream": None})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
    r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": None})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_a_client_that_leaves_mid_stream_frees_the_server(server, client):
    with httpx.stream("POST", f"{server}/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": "A", "max_tokens": 2000, "stream": True}) as r:
        for _ in zip(range(3), r.iter_lines()):
            pass  # leave after a few events of a long generation
    start = time.perf_counter()
    out = client.completions.create(model="tiny", prompt="B", max_tokens=5, temperature=0, timeout=60)
    assert out.usage.completion_tokens == 5 and time.perf_counter() - start < 30


def test_cli_errors_are_one_line(checkpoint, tmp_path):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "simplegpt", "serve", *args], capture_output=True, text=True,
                              timeout=120)

    missing = serve("--checkpoint", str(tmp_path / "nope"), "--port", "0")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = serve("--checkpoint", str(checkpoint), "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 1 and busy.stderr.count("\n") == 1 and "cannot listen" in busy.stderr


def test_int8_server(checkpoint, engine):
    proc, port = start(checkpoint, "--quantize", "int8", "--model-name", "tiny-int8", "--device", "cpu")
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        out = c.completions.create(model="tiny-int8", prompt="ROMEO:", max_tokens=10, temperature=0)
        assert out.usage.completion_tokens == 10 and out.model == "tiny-int8"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _browser() -> str | None:
    return next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)


@pytest.mark.parametrize("stream", [True, False])
def test_playground_in_a_real_browser(server, engine, stream):
    browser_path = _browser()
    if browser_path is None or not _has_playwright():
        if os.environ.get("CI"):
            raise RuntimeError("CI needs Chromium and playwright for the playground test (see .ci/run)")
        pytest.skip("no Chromium or playwright here: apt-get install chromium; pip install playwright")
    from playwright.sync_api import sync_playwright

    [want] = expected(engine, ["ROMEO:"], max_new_tokens=40, temperature=0)
    html = httpx.get(server).text
    assert "<title>simplegpt playground</title>" in html
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{server}/?max_tokens=40&temperature=0&stream={int(stream)}")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
            page.fill("#prompt", "ROMEO:")
            page.click("#generate")
            page.wait_for_function("document.body.dataset.finish !== undefined", timeout=60_000)
            assert page.evaluate("document.body.dataset.finish") == "length"
            assert page.inner_text("#output .completion") == want
            assert "40 tokens in" in page.inner_text("#status")
            # a bad setting shows the server's error message
            page.fill("#temperature", "5")
            page.click("#generate")
            page.wait_for_function("document.body.dataset.finish === 'error'", timeout=60_000)
            assert "temperature must be between 0 and 2" in page.inner_text("#status")
        finally:
            browser.close()


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


def test_model_name_from_a_run_folder_and_cors(tmp_path, checkpoint, server):
    run = tmp_path / "myrun" / "best"
    shutil.copytree(checkpoint, run)
    proc, port = start(run, "--cors-origin", "http://localhost:3000")
    try:
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == "myrun-best"
        # a browser's preflight from the allowed origin is answered; other origins, and servers
        # started without --cors-origin, give pages no access
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        ok = httpx.options(f"{base}/v1/completions", headers={"Origin": "http://localhost:3000", **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = httpx.get(f"{base}/v1/models", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        default = httpx.get(f"{server}/v1/models", headers={"Origin": "http://localhost:3000"})
        assert "access-control-allow-origin" not in default.headers
    finally:
        proc.terminate()
        proc.wait(timeout=30)

