"""The server against real clients' edge cases: one failing request among others, lone surrogates,
model ids with '/', stream_options, chat logprobs. Real servers on 127.0.0.1 (a `simplegpt serve`
process, or uvicorn in a thread where the test must reach into the process) and OpenAI's client."""

import contextlib
import fnmatch
import json
import socket
import threading
import time
import tomllib

import httpx
import pytest
import torch

from conftest import ROOT, make_tiny_gpt
from simplegpt import get_tokenizer, save_checkpoint
from simplegpt.engine import Engine, SamplingParams

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from simplegpt.generation import scheduler as batcher_module  # noqa: E402
from simplegpt.serve import ChatMessage, Limits, chat_prompt, create_app  # noqa: E402
from simplegpt.serve.routes import playground  # noqa: E402
from test_server import start  # noqa: E402


def tiny_engine(tokenizer) -> Engine:
    model = make_tiny_gpt(seed=0, scale=4.0, vocab_size=tokenizer.vocab_size, n_positions=48)
    return Engine(model, tokenizer)


@contextlib.contextmanager
def serving(engine: Engine, model_name: str = "tiny", limits: Limits = Limits()):
    """create_app(engine) served by uvicorn on 127.0.0.1 in a thread of this process; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, model_name, limits), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(400):
            if server.started:
                break
            time.sleep(0.025)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def byte_engine() -> Engine:
    return tiny_engine(get_tokenizer("byte"))


@pytest.fixture(scope="module")
def process(tmp_path_factory, byte_engine):
    """A `simplegpt serve --model-name org/tiny-gpt` process over byte_engine's model."""
    path = save_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", byte_engine.model, byte_engine.tokenizer)
    proc, port = start(path, "--model-name", "org/tiny-gpt")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


LONG = dict(prompt="ROMEO:", max_tokens=400, seed=3, temperature=0.9, ignore_eos=True)
LONG_PARAMS = SamplingParams(max_new_tokens=400, seed=3, temperature=0.9, stop_at_eos=False)


def stream_text(url: str, body: dict) -> tuple[str, list[dict]]:
    """A streamed completion's text and its events (an error event included)."""
    text, events = "", []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                text += "".join(c["text"] for c in events[-1].get("choices", []))
    return text, events


class Beside:
    """The LONG request streamed on a thread; `running` once its first piece came, `text` at the end."""

    def __init__(self, url: str, model: str):
        self.running, self.finished, self.text = threading.Event(), threading.Event(), None
        self.body = {"model": model, **LONG, "stream": True}
        self.thread = threading.Thread(target=self._read, args=(url,))
        self.thread.start()
        assert self.running.wait(60)

    def _read(self, url: str) -> None:
        text = ""
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=self.body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        text += "".join(c["text"] for c in json.loads(line[6:]).get("choices", []))
                        self.running.set()
            self.text = text
        finally:
            self.running.set()
            self.finished.set()

    def result(self) -> str:
        self.thread.join(60)
        return self.text


def test_a_tiny_temperature_is_greedy_and_fails_no_one(process, byte_engine):
    """temperature 1e-45 (logits / temperature overflowed to NaN, and the batch failed) beside a long
    request: it is greedy, and the long one gives what it gives alone."""
    model = "org/tiny-gpt"
    [alone] = byte_engine.generate(["ROMEO:"], LONG_PARAMS)
    [greedy] = byte_engine.generate(["JULIET:"], SamplingParams(max_new_tokens=20, temperature=0))
    long = Beside(process, model)
    for temperature in (1e-45, 1e-38, 5e-324):
        r = httpx.post(f"{process}/v1/completions", timeout=60, json={
            "model": model, "prompt": "JULIET:", "max_tokens": 20, "temperature": temperature})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy.text, r.text
    assert not long.finished.is_set()  # they ran beside it
    assert long.result() == alone.text


def test_a_failing_request_gets_a_500_and_the_others_go_on(byte_engine, monkeypatch):
    """A request whose decoding raises (its sampler, made to fail for seed 666) ends alone, as a 500 or
    an error event; a long request beside it finishes with the text it gives alone."""
    real = batcher_module.sample_next_token

    def sampler(logits, params, *args, **kw):
        if params.seed == 666:
            raise RuntimeError("a sampler that fails for this request")
        return real(logits, params, *args, **kw)

    monkeypatch.setattr(batcher_module, "sample_next_token", sampler)
    [alone] = byte_engine.generate(["ROMEO:"], LONG_PARAMS)
    with serving(byte_engine) as url:
        long = Beside(url, "tiny")
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "A", "seed": 666}, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert "a sampler that fails" in r.json()["error"]["message"]
        _, events = stream_text(url, {"model": "tiny", "prompt": "A", "seed": 666})
        assert events[-1]["error"]["code"] == "internal_error"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], seed=666)
        assert not long.finished.is_set()  # they ran beside it
        assert long.result() == alone.text
        ok = client.completions.create(model="tiny", prompt="B", max_tokens=5, seed=1)
        assert ok.usage.completion_tokens == 5


SURROGATE = "a\ud800b"  # valid JSON ("a\\ud800b"), but no Unicode text


@pytest.mark.parametrize("kind", ["char", "byte", "gpt2"])
def test_a_lone_surrogate_is_one_400_naming_the_field_on_every_route(kind):
    """GPT-2's tokenizer replaced it silently (and an echo could not be encoded back: a 500), the byte
    tokenizer refused it, the char one took it as a character: now every route and tokenizer answers
    one 400 naming where the text is."""
    tokenizer = get_tokenizer(kind, text="ab \ud800:\nUsertAsin") if kind == "char" else get_tokenizer(kind)
    user = {"role": "user", "content": SURROGATE}
    requests = [
        ("/v1/completions", {"prompt": SURROGATE}, "prompt"),
        ("/v1/completions", {"prompt": SURROGATE, "echo": True}, "prompt"),
        ("/v1/completions", {"prompt": SURROGATE, "echo": True, "logprobs": 1, "max_tokens": 0}, "prompt"),
        ("/v1/completions", {"prompt": SURROGATE, "stream": True}, "prompt"),
        ("/v1/completions", {"prompt": ["ok", SURROGATE], "echo": True}, "prompt.1"),
        ("/v1/completions", {"prompt": "ab", "stop": ["x", SURROGATE]}, "stop.1"),
        ("/v1/chat/completions", {"messages": [user]}, "messages.0.content"),
        ("/v1/chat/completions", {"messages": [user], "stream": True}, "messages.0.content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
         "messages.0.content.0.text"),
        ("/tokenize", {"prompt": SURROGATE}, "prompt"),
    ]
    with serving(tiny_engine(tokenizer)) as url:
        for route, body, field in requests:
            r = httpx.post(f"{url}{route}", content=json.dumps({"model": "tiny", **body}), timeout=60,
                           headers={"Content-Type": "application/json"})  # json.dumps writes \ud800 escaped
            assert r.status_code == 400, (route, body, r.text)
            error = r.json()["error"]
            assert error["param"] == field and "surrogate" in error["message"], (route, body, error)
        # the same text properly paired (U+1F642) or as UTF-8 is fine wherever the tokenizer knows it
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "ab", "echo": True, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("ab")


def test_a_model_id_with_a_slash_is_found_plain_and_percent_encoded(process):
    """Hugging Face-style names (org/tiny-gpt) were a 404 at GET /v1/models/{id}."""
    client = openai.OpenAI(base_url=f"{process}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["org/tiny-gpt"]
    assert client.models.retrieve("org/tiny-gpt").id == "org/tiny-gpt"
    for path in ("org/tiny-gpt", "org%2Ftiny-gpt", "org%2ftiny-gpt"):
        r = httpx.get(f"{process}/v1/models/{path}")
        assert r.status_code == 200 and r.json()["id"] == "org/tiny-gpt", path
    for path in ("org/other", "org", "org/tiny-gpt/x", "tiny-gpt"):
        r = httpx.get(f"{process}/v1/models/{path}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", path
    out = client.completions.create(model="org/tiny-gpt", prompt="A", max_tokens=3)
    assert out.model == "org/tiny-gpt"


def test_stream_options_without_stream_is_refused(process):
    client = openai.OpenAI(base_url=f"{process}/v1", api_key="unused", max_retries=0)
    user = [{"role": "user", "content": "hi"}]
    for stream in (False, None):  # null is the default: not streamed
        with pytest.raises(openai.BadRequestError, match="stream: true") as e:
            client.completions.create(model="org/tiny-gpt", prompt="A", max_tokens=2, stream=stream,
                                      stream_options={"include_usage": True})
        assert e.value.body["param"] == "stream_options"
        with pytest.raises(openai.BadRequestError, match="stream: true"):
            client.chat.completions.create(model="org/tiny-gpt", messages=user, max_tokens=2, stream=stream,
                                           stream_options={"include_usage": True})
    r = httpx.post(f"{process}/v1/completions", json={"model": "org/tiny-gpt", "prompt": "A", "echo": True,
                                                      "max_tokens": 0, "stream_options": {}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    # with stream: true it is taken; null stream_options is the default (none)
    chunks = list(client.chat.completions.create(model="org/tiny-gpt", messages=user, max_tokens=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 2
    r = httpx.post(f"{process}/v1/completions", json={"model": "org/tiny-gpt", "prompt": "A", "max_tokens": 2,
                                                      "stream_options": None})
    assert r.status_code == 200
    for options in ({"include_usage": "false"}, {"include_usage": 1}, {"usage": True}):  # no coercion, no unknown key
        r = httpx.post(f"{process}/v1/completions", json={"model": "org/tiny-gpt", "prompt": "A", "max_tokens": 2,
                                                          "stream": True, "stream_options": options})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("stream_options"), options


def chat_entries(url: str, model: str, seed: int, stop: list[str], stream: bool) -> tuple[str, list[dict], str]:
    """A sampled chat reply with logprobs: its content, its logprobs entries and its finish reason."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 24, "seed": seed,
            "temperature": 1.0, "stop": stop, "logprobs": True, "top_logprobs": 1}
    if not stream:
        choice = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
        return choice["message"]["content"], choice["logprobs"]["content"], choice["finish_reason"]
    content, entries, finish = "", [], None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                [c] = json.loads(line[6:])["choices"]
                content += c["delta"].get("content", "")
                entries += (c["logprobs"] or {}).get("content", [])
                finish = c["finish_reason"] or finish
    return content, entries, finish


def assert_entries_make_the_content(content: str, entries: list[dict], stops: list[str]) -> None:
    """The reported tokens' bytes are the content, with at most removed whitespace before it and the start
    of a stop string after it; neither end holds a token that shows none of the content."""
    joined = bytes(b for e in entries for b in e["bytes"]).decode("utf-8", "replace")
    if not content:
        assert entries == []
        return
    at = joined.find(content)
    assert at >= 0 and not joined[:at].strip(), (joined, content)
    tail = joined[at + len(content):]
    assert not tail or any(s.startswith(tail) or tail.startswith(s) for s in stops), (joined, content)
    with contextlib.suppress(UnicodeDecodeError):  # a token that is part of a character has no length of its own
        assert len(bytes(entries[0]["bytes"]).decode()) > at, (joined, content)
    with contextlib.suppress(UnicodeDecodeError):
        assert len(bytes(entries[-1]["bytes"]).decode()) > len(tail), (joined, content)


def test_chat_logprobs_are_the_tokens_of_the_message():
    """logprobs.content held the tokens of a matched stop string and of the whitespace removed before the
    reply: with a character vocabulary (a token per character) they now join to message.content exactly,
    streamed or not, over many seeds."""
    engine = tiny_engine(get_tokenizer("char", text="User: hi there\nAssistant:\t"))
    prompt = chat_prompt([ChatMessage(role="user", content="hi there")])
    stops = ["U", "\nUser:"]
    stopped = spaced = 0
    with serving(engine) as url:
        for seed in range(20):
            content, entries, finish = chat_entries(url, "tiny", seed, stops, stream=False)
            assert "".join(e["token"] for e in entries) == content, seed
            assert chat_entries(url, "tiny", seed, stops, stream=True) == (content, entries, finish), seed
            [alone] = engine.generate([prompt], SamplingParams(max_new_tokens=24, seed=seed, stop=stops))
            assert alone.text.lstrip() == content
            stopped += isinstance(alone.stop_reason, str)
            spaced += alone.text != content
    assert stopped >= 4 and spaced >= 4, (stopped, spaced)  # the cases that went wrong were met


def test_chat_logprobs_with_gpt2_tokens_that_span_the_edges():
    """With GPT-2's tokens (' Hello' holds the space removed; 'x\\n' the start of '\\nUser:') a token that
    shows any of the content is reported whole, none that shows nothing; streamed as not."""
    stops = [" s", " c", " p", "o"]  # tokens start with the first three; "o" falls inside them
    with serving(tiny_engine(get_tokenizer("gpt2"))) as url:
        spanned = 0
        for seed in range(14):
            content, entries, finish = chat_entries(url, "tiny", seed, stops, stream=False)
            assert_entries_make_the_content(content, entries, [*stops, "\nUser:"])
            assert chat_entries(url, "tiny", seed, stops, stream=True) == (content, entries, finish)
            spanned += bytes(b for e in entries for b in e["bytes"]).decode("utf-8", "replace") != content
        assert spanned >= 3  # the edge cases were met


def test_two_apps_in_one_process_each_keep_their_own_name_and_limits(byte_engine):
    """Each app's routes read its own state (create_app's Limits: the one way to set them), not
    another app's: two apps over one engine, in one process, at once."""
    small = Limits(max_tokens=8, max_rows=2, max_batch=3)
    with serving(byte_engine, "small", small) as a, serving(byte_engine, "large") as b:
        assert [m["id"] for m in httpx.get(f"{a}/v1/models").json()["data"]] == ["small"]
        assert [m["id"] for m in httpx.get(f"{b}/v1/models").json()["data"]] == ["large"]
        assert httpx.get(f"{a}/load").json()["max_batch"] == 3 and httpx.get(f"{b}/load").json()["max_batch"] == 16
        assert "simplegpt_batch_capacity 3.0" in httpx.get(f"{a}/metrics").text
        body = {"prompt": "ROMEO:", "max_tokens": 9}
        r = httpx.post(f"{a}/v1/completions", json={"model": "small", **body}, timeout=60)
        assert r.status_code == 400 and "between 1 and 8" in r.json()["error"]["message"]
        r = httpx.post(f"{a}/v1/completions", json={"model": "small", "prompt": ["A", "B"], "n": 2, "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 400 and "at most 2" in r.json()["error"]["message"]
        r = httpx.post(f"{a}/v1/completions", json={"model": "large", **body}, timeout=60)
        assert r.status_code == 404
        r = httpx.post(f"{b}/v1/completions", json={"model": "large", **body, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 9


def test_the_playground_page_ships_where_the_server_reads_it():
    """The page GET / answers with is package data (pyproject names it), so an installed server has it."""
    page = playground.STATIC / "index.html"
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["simplegpt"]
    assert page.is_file()
    assert any(fnmatch.fnmatch(page.relative_to(ROOT / "simplegpt").as_posix(), p) for p in patterns)
