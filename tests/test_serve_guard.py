"""Connections that never finish their request (simplegpt/serve/guard.py, header_timeout_protocol):
a real `simplegpt serve` process on 127.0.0.1 and real sockets. Half-sent and trickled headers and
silent connections are closed within --header-timeout, while /health and normal requests are
answered at once; a request whose headers are in is not cut by it."""

import socket
import threading
import time

import httpx
import pytest

from conftest import make_tiny_gpt
from simplegpt import get_tokenizer, save_checkpoint

pytest.importorskip("fastapi")

from test_server import start  # noqa: E402

HEADER_TIMEOUT = 2.0
SLACK = 3.0  # a busy machine's scheduling, on top of the bound


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = get_tokenizer("byte")
    model = make_tiny_gpt(seed=0, vocab_size=tok.vocab_size, n_positions=32)
    checkpoint = save_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", model, tok)
    proc, port = start(checkpoint, "--header-timeout", str(HEADER_TIMEOUT), "--keep-alive-timeout", "30")
    yield proc, port
    proc.terminate()
    proc.wait(timeout=30)


def closed_by_server(sock: socket.socket, within: float) -> float | None:
    """Seconds until the server closed sock (reading EOF or a reset), or None if it was still open
    after `within` seconds. Reads and drops anything the server sends first."""
    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < within:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - start
        except socket.timeout:
            continue
        except ConnectionResetError:
            return time.monotonic() - start
    return None


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response (status line, headers and a Content-Length body) from sock."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(4096)
        if not more:
            break
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        more = sock.recv(4096)
        if not more:
            break
        body += more
    return head + b"\r\n\r\n" + body


def test_fifty_half_sent_requests_are_closed_within_the_bound_while_others_are_served(server):
    _, port = server
    half = []
    opened = time.monotonic()
    for i in range(50):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl" if i % 2 else
                  b"GET /health HTTP/1.1\r\nHo")
        half.append(s)
    try:
        # meanwhile: /health and a completion are answered at once, on their own connections
        t = time.monotonic()
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json() == {"status": "ok"}
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=10,
                         json={"model": "tiny", "prompt": "A", "max_tokens": 3})
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
        assert time.monotonic() - t < HEADER_TIMEOUT  # not after the half-sent ones were dropped
        for s in half:
            left = HEADER_TIMEOUT + SLACK - (time.monotonic() - opened)
            assert closed_by_server(s, max(left, 0.5)) is not None, "a half-sent request was held open"
        assert time.monotonic() - opened > HEADER_TIMEOUT * 0.9  # they had their time first
    finally:
        for s in half:
            s.close()


def test_a_trickling_client_and_a_silent_one_are_closed_too(server):
    _, port = server
    silent = socket.create_connection(("127.0.0.1", port), timeout=10)
    trickle = socket.create_connection(("127.0.0.1", port), timeout=10)
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"x" * 1000 + b"\r\n\r\n"
    closed = threading.Event()

    def drip() -> None:  # a byte every 0.1 s: data keeps coming, the request never completes in time
        for b in request:
            if closed.is_set():
                return
            try:
                trickle.sendall(bytes([b]))
            except OSError:
                return
            time.sleep(0.1)

    threading.Thread(target=drip, daemon=True).start()
    try:
        assert closed_by_server(silent, HEADER_TIMEOUT + SLACK) is not None
        assert closed_by_server(trickle, SLACK) is not None  # by now past the bound too
    finally:
        closed.set()
        silent.close()
        trickle.close()


def test_a_kept_alive_connection_gets_the_bound_again_and_whole_requests_are_not_cut(server):
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")
        time.sleep(HEADER_TIMEOUT * 0.6)  # a pause between requests (keep-alive is 30 s here)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # its headers in time: answered
        assert read_response(s).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\nHo")  # the next one half-sent: closed within the bound
        assert closed_by_server(s, HEADER_TIMEOUT + SLACK) is not None
    # a request whose headers are in and whose body is slow is the body timeout's (408), not cut here
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 60\r\n\r\n{\"model\": \"tiny\", ")
        time.sleep(HEADER_TIMEOUT + 1)
        s.sendall(b"\"prompt\": \"A\", \"max_tokens\": 2}".ljust(60 - 18))
        answer = read_response(s)
        assert answer.startswith(b"HTTP/1.1 200"), answer
