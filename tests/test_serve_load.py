"""`simplegpt serve` under load and under attack: real server processes on 127.0.0.1, OpenAI's
official client, many clients at once, limits, keys, metrics and SIGTERM."""

import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import make_tiny_gpt
from simplegpt import get_tokenizer, load_checkpoint, save_checkpoint
from simplegpt.engine import Engine, SamplingParams

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from test_server import start  # noqa: E402
from test_serve_guard import read_response  # noqa: E402

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = get_tokenizer("byte")
    model = make_tiny_gpt(seed=0, scale=4.0, vocab_size=tok.vocab_size, n_positions=48)
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", model, tok)


@pytest.fixture(scope="module")
def engine(checkpoint) -> Engine:
    ck = load_checkpoint(checkpoint)
    return Engine(ck.model, ck.tokenizer)


@pytest.fixture(scope="module")
def server(checkpoint):
    """A server with a key, a small queue and short limits, and its address."""
    proc, port = start(checkpoint, "--api-key", KEY, "--max-batch", "4", "--max-queue", "16",
                       "--max-body-bytes", "20000", "--max-tokens", "1000000")
    yield proc, f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def client(base: str, key: str = KEY) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def requests(engine: Engine):
    """Eight requests, greedy and seeded, stop strings, different max_tokens (some past the
    48-token window), and what each gives alone."""
    out = []
    for i in range(8):
        kw = dict(max_tokens=6 + 9 * i, temperature=0.0 if i % 2 else 0.8, seed=40 + i)
        prompt = ["ROMEO:", "JULIET:", "A", "Bee"][i % 4] * (1 + i % 3)
        params = SamplingParams(max_new_tokens=kw["max_tokens"], temperature=kw["temperature"], seed=kw["seed"])
        want = engine.generate([prompt], params)[0].text
        if i in (3, 6):  # a stop string from the text alone: the request stops there
            kw["stop"] = [want[len(want) // 2: len(want) // 2 + 2]]
            want = want[: want.index(kw["stop"][0])]
        out.append((prompt, kw, want))
    return out


def test_eight_concurrent_requests_each_give_what_they_give_alone(server, engine):
    _, base = server
    c = client(base)
    reqs = requests(engine)

    def plain(r):
        prompt, kw, _ = r
        return c.completions.create(model="tiny", prompt=prompt, **kw).choices[0].text

    def streamed(r):
        prompt, kw, _ = r
        return "".join(ch.choices[0].text for ch in c.completions.create(model="tiny", prompt=prompt, stream=True,
                                                                          **kw) if ch.choices)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(plain, reqs)) + list(pool.map(streamed, reqs))
        mixed = [pool.submit(plain if i % 2 else streamed, r) for i, r in enumerate(reqs)]
        mixed = [f.result() for f in mixed]
    want = [w for _, _, w in reqs]
    assert got == want + want and mixed == want


def test_a_client_that_leaves_frees_its_row(checkpoint):
    proc, port = start(checkpoint, "--max-batch", "1", "--max-tokens", "1000000")  # one row: the next request waits for it
    base = f"http://127.0.0.1:{port}"
    try:
        body = {"model": "tiny", "prompt": "A", "max_tokens": 100_000, "ignore_eos": True}
        with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            for _ in zip(range(3), r.iter_lines()):
                pass
        out = client(base).completions.create(model="tiny", prompt="B", max_tokens=5, temperature=0)
        assert out.usage.completion_tokens == 5
        # not streamed: a client that times out is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/completions", json=body, timeout=1.5)
        out = client(base).completions.create(model="tiny", prompt="B", max_tokens=5, temperature=0, timeout=60)
        assert out.usage.completion_tokens == 5
        assert httpx.get(f"{base}/load").json()["running"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_keys_are_required_on_the_api_only(server):
    _, base = server
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    assert httpx.get(base).status_code == 200  # the playground page, which asks for the key
    for headers in ({}, auth("wrong"), {"Authorization": KEY}):
        r = httpx.get(f"{base}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        client(base, "wrong").completions.create(model="tiny", prompt="A", max_tokens=2)
    assert httpx.get(f"{base}/metrics").status_code == 401
    for path in ("/tokenize", "/detokenize"):  # the tokenizer routes (lm_eval's client) are the API's too
        body = {"prompt": "A"} if path == "/tokenize" else {"tokens": [65]}
        assert httpx.post(f"{base}{path}", json=body).status_code == 401
        assert httpx.post(f"{base}{path}", json=body, headers=auth()).status_code == 200
    assert httpx.get(f"{base}/tokenizer_info").status_code == 401
    assert client(base).completions.create(model="tiny", prompt="A", max_tokens=2).usage.completion_tokens == 2


def test_limits_are_answered_in_openais_shape_while_the_server_serves(server, engine):
    _, base = server

    def post(body=None, content=None, headers=None):
        return httpx.post(f"{base}/v1/completions", json=body, content=content, timeout=60,
                          headers={**auth(), "Content-Type": "application/json", **(headers or {})})

    def error(r, status):
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        return r.json()["error"]

    e = error(post(content=b"x" * 30_000), 413)
    assert "20000" in e["message"]
    e = error(post({"model": "tiny", "prompt": "A" * 49}), 400)  # the window is 48 tokens (bytes)
    assert e["param"] == "prompt" and "48" in e["message"]
    r = post({"model": "tiny", "prompt": "AB" * 40, "truncate_prompt_tokens": 10, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 10
    assert error(post({"model": "tiny", "prompt": "A", "stop": ["x" * 5_000]}), 400)["param"] == "stop"
    assert error(post({"model": "tiny", "prompt": "A", "seed": 2**70}), 400)["param"] == "seed"
    error(post(content=b'{"model": "tiny", "prompt": "\xff\xfe"}'), 400)  # not UTF-8
    error(post(content=b"[" * 9_000 + b"]" * 9_000), 400)  # nested too deep for a parser
    error(httpx.get(f"{base}/v1/models", headers={**auth(), "Host": "evil.example"}), 400)  # DNS rebinding
    error(httpx.get(f"{base}/v1/nowhere", headers=auth()), 404)
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    out = client(base).completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0)
    assert out.choices[0].text == engine.generate(["ROMEO:"], SamplingParams(max_new_tokens=8, temperature=0))[0].text


def test_a_full_queue_is_a_429_with_retry_after(server):
    _, base = server
    body = {"model": "tiny", "prompt": "A", "max_tokens": 100_000, "ignore_eos": True, "stream": True}
    c = httpx.Client(headers=auth(), timeout=60)
    leave = threading.Event()

    def long(n: int) -> int:
        with c.stream("POST", f"{base}/v1/completions", json={**body, "n": n}) as r:
            leave.wait(180)
            return r.status_code  # and the client leaves: its rows are cancelled

    def wait_for(running: int, queued: int) -> dict:
        deadline = time.monotonic() + 120  # seconds on a loaded 2-core machine
        while time.monotonic() < deadline:
            load = c.get(f"{base}/load").json()
            if load["running"] == running and load["queued"] == queued:
                break
            time.sleep(0.05)
        return load

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # 4 rows run (--max-batch 4) and 16 wait (--max-queue 16); then there is no room. The second
        # request is sent once the first one's rows run: while they still wait, it would not fit.
        streams = [pool.submit(long, 4)]
        wait_for(4, 0)
        streams.append(pool.submit(long, 16))
        load = wait_for(4, 16)
        try:
            assert load["running"] == 4 and load["queued"] == 16, load
            r = c.post(f"{base}/v1/completions", json={**body, "n": 1, "max_tokens": 2, "stream": False})
            assert r.status_code == 429 and r.headers["Retry-After"] and r.json()["error"]["type"] == "rate_limit_error"
            assert c.get(f"{base}/health").status_code == 200
        finally:
            leave.set()
        assert [f.result() for f in streams] == [200, 200]
    for _ in range(100):  # the leaving clients' rows leave at the batcher's next step
        if c.get(f"{base}/load").json() == {"running": 0, "queued": 0, "max_batch": 4}:
            break
        time.sleep(0.05)
    assert c.get(f"{base}/load").json() == {"running": 0, "queued": 0, "max_batch": 4}


def test_a_request_past_its_time_is_cancelled(checkpoint):
    proc, port = start(checkpoint, "--request-timeout", "2", "--max-tokens", "1000000")
    base = f"http://127.0.0.1:{port}"
    body = {"model": "tiny", "prompt": "A", "max_tokens": 100_000, "ignore_eos": True}
    try:
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-1])["error"]["type"] == "timeout_error"  # the status was sent: an event says it
        assert httpx.get(f"{base}/load").json()["running"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_metrics_count_what_was_sent(checkpoint):
    proc, port = start(checkpoint)
    base = f"http://127.0.0.1:{port}"
    try:
        c = client(base)
        for n in (3, 5):
            c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=n, temperature=0)
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="tiny", prompt="A", temperature=5)
        text = httpx.get(f"{base}/metrics").text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        assert values['simplegpt_requests_total{method="POST",route="/v1/completions",status="200"}'] == 2
        assert values['simplegpt_requests_total{method="POST",route="/v1/completions",status="400"}'] == 1
        assert values["simplegpt_generated_tokens_total"] == 8
        assert values["simplegpt_prompt_tokens_total"] == 12
        assert values["simplegpt_time_to_first_token_seconds_count"] == 2
        assert values["simplegpt_queue_rows"] == 0 and values["simplegpt_batch_capacity"] == 16
        # one access-log line per request
        time.sleep(0.2)
        assert sum('"POST /v1/completions"' in line for line in proc.log) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_sigterm_lets_running_requests_finish_and_exits_0(checkpoint, engine):
    proc, port = start(checkpoint)
    base = f"http://127.0.0.1:{port}"
    params = SamplingParams(max_new_tokens=1000, temperature=0)
    want = engine.generate(["JULIET:"], params)[0].text
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        def stream() -> str:
            with httpx.stream("POST", f"{base}/v1/completions", timeout=60, json={
                    "model": "tiny", "prompt": "JULIET:", "max_tokens": 1000, "temperature": 0, "stream": True}) as r:
                return "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                               if line.startswith("data: {"))

        streamed = pool.submit(stream)
        plain = pool.submit(httpx.post, f"{base}/v1/completions", timeout=60,
                            json={"model": "tiny", "prompt": "JULIET:", "max_tokens": 1000, "temperature": 0})
        while httpx.get(f"{base}/load").json()["running"] < 2:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # while both run
        assert proc.wait(timeout=60) == 0
        assert streamed.result() == want
        assert plain.result().json()["choices"][0]["text"] == want


def test_the_playground_asks_for_the_key_in_a_real_browser(server, engine):
    from test_server import _browser, _has_playwright

    browser_path = _browser()
    if browser_path is None or not _has_playwright():
        pytest.skip("no Chromium or playwright here: apt-get install chromium; pip install playwright")
    from playwright.sync_api import sync_playwright

    _, base = server
    want = engine.generate(["ROMEO:"], SamplingParams(max_new_tokens=20, temperature=0))[0].text
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{base}/?max_tokens=20&temperature=0")
            page.wait_for_function("document.getElementById('model').textContent.includes('API key')")
            assert "needs an API key" in page.inner_text("#status")
            page.fill("#api_key", KEY)
            page.dispatch_event("#api_key", "change")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
            page.wait_for_function("document.getElementById('load').textContent.includes('decoding')")
            assert "0/4 decoding" in page.inner_text("#load")
            page.fill("#prompt", "ROMEO:")
            page.click("#generate")
            page.wait_for_function("document.body.dataset.finish !== undefined", timeout=60_000)
            assert page.inner_text("#output .completion") == want and "tokens/s" in page.inner_text("#status")
            # The key field fires "change" again when it loses focus; the model list that
            # reloads then must leave the generation's result in the status line.
            with page.expect_response(lambda r: r.url.endswith("/v1/models")):
                page.dispatch_event("#api_key", "change")
            page.wait_for_timeout(200)
            assert "tokens/s" in page.inner_text("#status")
        finally:
            browser.close()


def test_keys_from_a_file_and_the_environment_and_a_warning_for_an_open_server(checkpoint, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nsk-one\n\nsk-two\n")
    proc, port = start(checkpoint, "--api-key-file", str(keys), env={"SIMPLEGPT_API_KEY": "sk-env"})
    try:
        base = f"http://127.0.0.1:{port}"
        for key in ("sk-one", "sk-two", "sk-env"):
            assert httpx.get(f"{base}/v1/models", headers=auth(key)).status_code == 200
        assert httpx.get(f"{base}/v1/models", headers=auth("# team keys")).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    proc = subprocess.Popen([sys.executable, "-m", "simplegpt", "serve", "--checkpoint", str(checkpoint),
                             "--host", "0.0.0.0", "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stderr.readline(), proc.stderr.readline()]
        assert "0.0.0.0" in lines[0] and "warning" in lines[1] and "no API key" in lines[1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_half_sent_body_gets_408_while_others_are_served(checkpoint):
    proc, port = start(checkpoint, "--body-timeout", "3")
    base = f"http://127.0.0.1:{port}"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
            slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"model\"")
            out = client(base).completions.create(model="tiny", prompt="A", max_tokens=3)
            slow.setblocking(False)
            with pytest.raises(BlockingIOError):  # served while the slow client still holds its request
                slow.recv(1)
            slow.setblocking(True)
            answer = read_response(slow).decode()
            assert out.usage.completion_tokens == 3
        assert answer.startswith("HTTP/1.1 408") and '"type": "invalid_request_error"' in answer.replace('":"', '": "')
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_scoring_flood_gets_429s_while_a_completion_finishes_within_its_timeout(checkpoint):
    """echo with max_tokens 0 (scoring, as evaluation harnesses send it) passes the same queue limit
    as generation: a flood of them gets 429s, and a completion sent in the middle of it is answered
    before its --request-timeout (a 504 would say it was not)."""
    timeout = 30
    proc, port = start(checkpoint, "--max-queue", "8", "--request-timeout", str(timeout))
    base = f"http://127.0.0.1:{port}"
    score = {"model": "tiny", "prompt": [[65 + i % 26] * 40 for i in range(5)], "echo": True, "max_tokens": 0,
             "logprobs": 1}  # 5 rows: two of them do not fit in --max-queue 8
    flooding = threading.Event()
    flooding.set()

    def flood() -> list[int]:
        codes = []
        with httpx.Client(timeout=120) as c:
            while flooding.is_set():
                codes.append(c.post(f"{base}/v1/completions", json=score).status_code)
        return codes

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            floods = [pool.submit(flood) for _ in range(8)]
            time.sleep(1)
            try:
                r = httpx.post(f"{base}/v1/completions", timeout=120,
                               json={"model": "tiny", "prompt": "ROMEO:", "max_tokens": 8, "ignore_eos": True})
            finally:
                flooding.clear()
            codes = [c for f in floods for c in f.result()]
        assert r.status_code == 200, r.text  # within its timeout (else a 504), though the queue was full
        assert r.json()["usage"]["completion_tokens"] == 8
        assert set(codes) == {200, 429} and codes.count(429) >= 1, codes
        assert httpx.get(f"{base}/load").json()["queued"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_trickled_body_is_cut_at_the_body_timeout(checkpoint):
    """--body-timeout bounds the whole body, not the gap between its bytes: a client that sends one
    byte every fraction of the timeout gets 408 before its body is complete."""
    body_timeout = 1.5
    proc, port = start(checkpoint, "--body-timeout", str(body_timeout))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
            slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 200\r\n\r\n")
            sent = 0
            slow.setblocking(False)
            while sent < 200:
                try:
                    if slow.recv(1, socket.MSG_PEEK):
                        break  # answered
                except BlockingIOError:
                    pass
                slow.send(b" ")
                sent += 1
                time.sleep(body_timeout / 6)  # far inside the timeout between two bytes
            slow.setblocking(True)
            answer = read_response(slow).decode()
        assert answer.startswith("HTTP/1.1 408"), answer
        assert sent < 200  # cut before the whole body came (it would take 200 / 6 timeouts)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_small_hostile_requests_are_400s_and_the_schema_needs_the_key(server):
    _, base = server

    def error(r, status):
        assert r.status_code == status, r.text
        return r.json()["error"]

    chat = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
    e = error(httpx.post(f"{base}/v1/chat/completions", json=chat, headers=auth()), 400)
    assert e["param"] == "messages.0.content.0.text", e
    completion = {"model": "tiny", "prompt": "A"}
    for field, value in (("max_tokens", True), ("n", True), ("temperature", True), ("logprobs", False),
                         ("seed", True), ("temperature", "0.5"), ("n", 1.0), ("echo", 1), ("prompt", [65, True])):
        e = error(httpx.post(f"{base}/v1/completions", json={**completion, field: value}, headers=auth()), 400)
        assert e["param"].split(".")[0] == field, (field, value, e)
    chat["messages"][0]["content"] = [{"type": "text", "text": "Hi"}]
    e = error(httpx.post(f"{base}/v1/chat/completions", json={**chat, "max_completion_tokens": True},
                         headers=auth()), 400)
    assert e["param"] == "max_completion_tokens"
    assert error(httpx.post(f"{base}/detokenize", json={"tokens": [65, True]}, headers=auth()), 400)["param"] \
        .startswith("tokens")
    assert httpx.post(f"{base}/v1/chat/completions", json={**chat, "max_tokens": 2},
                      headers=auth()).status_code == 200
    port = base.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}@evil.example", f"localhost:{port}@evil.example", "127.0.0.1:x", "[::1]x"):
        error(httpx.get(f"{base}/health", headers={"Host": host}), 400)
    assert httpx.get(f"{base}/health", headers={"Host": f"[::1]:{port}"}).status_code == 200
    for path in ("/docs", "/redoc"):  # no pages that load their scripts from a CDN
        assert httpx.get(f"{base}{path}", headers=auth()).status_code == 404
    error(httpx.get(f"{base}/openapi.json"), 401)
    assert httpx.get(f"{base}/openapi.json", headers=auth()).json()["info"]["title"] == "simplegpt"


def test_a_stream_past_the_shutdown_timeout_ends_with_an_error_event_and_one_log_line(checkpoint):
    proc, port = start(checkpoint, "--shutdown-timeout", "1", "--max-tokens", "1000000")
    base = f"http://127.0.0.1:{port}"
    body = {"model": "tiny", "prompt": "A", "max_tokens": 100_000, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        def stream() -> list[str]:
            with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]

        streamed = pool.submit(stream)
        plain = pool.submit(httpx.post, f"{base}/v1/completions", json=body, timeout=60)
        while httpx.get(f"{base}/load").json()["running"] < 2:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        events = streamed.result()
        r = plain.result()
    assert json.loads(events[-1])["error"]["code"] == "server_shutdown", events[-1]  # not cut off unannounced
    assert "--shutdown-timeout (1 s)" in json.loads(events[-1])["error"]["message"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutdown"
    time.sleep(0.2)
    log = "".join(proc.log)
    assert "Traceback" not in log, log
    [line] = [line for line in proc.log if "shutdown" in line]
    assert line.strip() == "simplegpt serve: --shutdown-timeout (1 s) ran out: 2 running request(s) stopped"
