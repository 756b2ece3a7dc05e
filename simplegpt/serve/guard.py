"""What every request passes before a route: the Host check, the API key, the body's size and
read time, and after it the access-log line and the request counters. An ASGI middleware, so it
also covers streamed responses and bodies the routes never read.

Before a request reaches the app its headers must arrive: `header_timeout_protocol` bounds how
long a connection may take to send them (uvicorn bounds only the idle time between requests)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.exceptions import HTTPException

from .errors import error_body

log = logging.getLogger("simplegpt.serve")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

PROTECTED = ("/v1/", "/metrics", "/tokenize", "/detokenize", "/tokenizer_info",
             "/openapi.json")  # need the key, when there is one


class BodyTooLarge(HTTPException):
    """Raised while the route reads a body past the limit; FastAPI passes HTTPExceptions on, and
    errors.add_error_handlers answers them in OpenAI's format."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the server's --max-body-bytes ({limit} bytes)")


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request body took longer than {seconds:g} s to arrive")


class Guard:
    """An ASGI middleware around the app (see the module docstring).

    api_keys: keys a /v1 request (and /metrics) must send as `Authorization: Bearer KEY`, none = open;
    allowed_hosts: host names the Host header may name (None = any), which stops a web page from
    reaching a loopback server through DNS rebinding; max_body: bytes a request body may have (413);
    body_timeout: seconds the client may take to send its whole body (408); on_done(method, path,
    status, seconds): called once per request (metrics).
    """

    def __init__(self, app, api_keys: Sequence[str] = (), allowed_hosts: Sequence[str] | None = None,
                 max_body: int = 2 * 2**20, body_timeout: float = 30.0,
                 on_done: Callable[[str, str, int, float], None] | None = None):
        self.app, self.max_body, self.body_timeout, self.on_done = app, max_body, body_timeout, on_done
        self.keys = [k.encode() for k in api_keys]
        self.hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self.refuse(scope)
            if refusal is not None:
                await self.answer(sending, *refusal)
                return
            await self.app(scope, self.reader(receive), sending)
        finally:
            seconds = time.perf_counter() - start
            client = scope.get("client") or ("-", 0)
            log.info('%s "%s %s" %d %.3fs', client[0], scope["method"], scope["path"], status[0], seconds)
            if self.on_done is not None:
                self.on_done(scope["method"], scope["path"], status[0], seconds)

    def refuse(self, scope: Scope) -> tuple[int, str, dict[str, str] | None] | None:
        """(status, message, headers) for a request refused before its route, or None."""
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        if self.hosts is not None:
            host = headers.get("host", b"").decode("latin-1").lower()
            if host_name(host) not in self.hosts:
                return 400, f"the Host header {host!r} is not one this server answers to", None
        if self.keys and scope["path"].startswith(PROTECTED):
            auth = headers.get("authorization", b"")
            scheme, _, key = auth.partition(b" ")
            # every key compared, each in constant time: the answer's timing tells nothing of them
            ok = scheme.lower() == b"bearer" and sum(hmac.compare_digest(key.strip(), k) for k in self.keys) > 0
            if not ok:
                what = "no API key" if not auth else "an invalid API key"
                return (401, f"{what} was sent: send 'Authorization: Bearer KEY' with one of the server's keys",
                        {"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return 413, f"the request body is larger than the server's --max-body-bytes ({self.max_body} bytes)", None
        return None

    def reader(self, receive: Receive) -> Receive:
        """receive, with the body's size bounded (BodyTooLarge) and the whole body due within
        body_timeout of the request's start (BodyTimeout), however its bytes trickle in."""
        seen = [0, False]  # bytes so far, body complete
        loop = asyncio.get_running_loop()
        due = loop.time() + self.body_timeout

        async def receiving() -> dict:
            if seen[1]:
                return await receive()  # after the body: only a disconnect comes, whenever it comes
            try:
                message = await asyncio.wait_for(receive(), max(0.0, due - loop.time()))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body:
                    raise BodyTooLarge(self.max_body)
                seen[1] = not message.get("more_body", False)
            return message

        return receiving

    @staticmethod
    async def answer(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(error_body(message, status, code="invalid_api_key" if status == 401 else None)).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


# A Host header (RFC 9110 7.2): a name, an IPv4 address or a bracketed IPv6 address, then an optional port.
HOST = re.compile(r"(?:\[([0-9a-f:.]+)\]|([a-z0-9._-]+))(?::[0-9]*)?")


def host_name(host: str) -> str | None:
    """The name or address a lowercase Host header gives (an IPv6 address without its brackets);
    None for anything else, such as 'localhost:8000@evil.com', which a looser split would read as
    localhost."""
    m = HOST.fullmatch(host)
    return None if m is None else m[1] or m[2]


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's HTTP protocol (its AutoHTTPProtocol: httptools where installed, else h11) with a
    deadline for a request's headers: a connection that has not sent a whole request line and headers
    within `seconds` of opening, or of its previous response's end, is closed. This drops clients
    that send half a request, or trickle its bytes, and would otherwise hold a connection (one of
    --max-connections) for as long as they like. The deadline does not move when bytes arrive, and
    a request whose headers are in (its body is bounded by Guard's body_timeout, its run by the
    request timeout) is never cut by it. Pass the class as uvicorn.Config(http=...)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderTimeoutProtocol(AutoHTTPProtocol):
        header_timeout = seconds

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_deadline = None
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()  # the next request's headers: again at most header_timeout

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            self._disarm_header_deadline()
            if not self.transport.is_closing():
                self._header_deadline = self.loop.call_later(self.header_timeout, self._header_deadline_passed)

        def _disarm_header_deadline(self) -> None:
            if getattr(self, "_header_deadline", None) is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _header_deadline_passed(self) -> None:
            self._header_deadline = None
            in_request = self.cycle is not None and not self.cycle.response_complete
            if not in_request and not self.transport.is_closing():
                log.info("%s closed: no whole request headers within %g s", (self.client or ("-",))[0],
                         self.header_timeout)
                self.transport.close()

    return HeaderTimeoutProtocol
