"""simplegpt serve: an OpenAI-compatible HTTP API and a web playground for a checkpoint."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from ..cli import add_checkpoint_argument, add_engine_arguments, check_engine_arguments, load_engine, model_name
from ..errors import MissingDependencyError, OptionError, file_access_errors

HELP = "serve a checkpoint over an OpenAI-compatible HTTP API, with a web playground"
DESCRIPTION = (
    "Serve a checkpoint over HTTP: /v1/completions, /v1/chat/completions and /v1/models in the shapes of "
    "OpenAI's API (its official clients work with base_url=http://HOST:PORT/v1 and any api_key), and a "
    "playground page at /, /health and Prometheus metrics at /metrics. Needs the serve extra: "
    "pip install 'simplegpt-toolkit[serve]'. Requests are batched continuously: each joins the running decode "
    "batch (up to --max-batch sequences) as soon as it is prefilled, and leaves it when done. Binds to 127.0.0.1 "
    "by default; --host 0.0.0.0 opens it to the network: set an API key (--api-key, SIMPLEGPT_API_KEY or "
    "--api-key-file) first. SIGTERM or Ctrl-C stops taking requests and lets running ones finish "
    "(--shutdown-timeout)."
)


# The server's time limits, in seconds: option, default, help.
TIME_LIMITS = (
    ("--request-timeout", 600.0, "a request still running after this long is cancelled (504; 0 = no limit)"),
    ("--body-timeout", 30.0, "a client that takes longer than this to send a request body gets 408"),
    ("--header-timeout", 10.0, "a connection that takes longer than this to send a request's line and headers "
                               "(after it opens, or after its previous response) is closed (0 = no limit)"),
    ("--keep-alive-timeout", 5.0, "an idle keep-alive connection is closed after this long"),
    ("--shutdown-timeout", 30.0, "on SIGTERM or Ctrl-C, how long running requests may take to finish; those "
                                 "still running then are stopped (503, or an error event when streamed)"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(p, "checkpoint directory to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0 = any free port)")
    p.add_argument("--model-name", default=argparse.SUPPRESS,
                   help="the model id clients send and /v1/models lists (default: the checkpoint's folder name; "
                        "out/RUN/best is served as RUN-best)")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="the most new tokens a request may ask for, per sequence (a generation holds the server)")
    p.add_argument("--max-sequences", type=int, default=64,
                   help="the most sequences (prompts x n) one request may ask for")
    p.add_argument("--max-batch", type=int, default=16,
                   help="the most sequences decoded together in one step (16 fills the CPU kernels' rows); "
                        "more wait in the queue")
    p.add_argument("--max-queue", type=int, default=256,
                   help="the most sequences that may wait for a place in the batch; beyond them a request gets "
                        "429 with Retry-After")
    p.add_argument("--max-body-bytes", type=int, default=2 * 2**20,
                   help="the largest request body taken (413 beyond)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections served at once; more get 503")
    for option, seconds, help_text in TIME_LIMITS:
        p.add_argument(option, type=float, default=seconds, metavar="SECONDS", help=help_text)
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 routes and /metrics (repeat for several; "
                        "also SIMPLEGPT_API_KEY); /health and the playground page stay open")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="a file of API keys, one a line (blank lines and # comments skipped)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a host name clients may use in the Host header; a server on a loopback address answers "
                        "only localhost and its own address unless named here (this stops DNS rebinding)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="one line per request on stderr: client, method, path, status, seconds")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from this origin (e.g. http://localhost:3000, or '*' for any) call the API "
                        "from a browser; repeat for several; none by default")
    add_engine_arguments(p, "a server")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve import Limits, create_app
        from ..serve.guard import header_timeout_protocol
    except ModuleNotFoundError as e:
        if (e.name or "").startswith("simplegpt"):
            raise
        raise MissingDependencyError(f"simplegpt serve needs {e.name}: "
                                     "pip install 'simplegpt-toolkit[serve]'") from None
    check_engine_arguments(args)
    for option, value in (("--max-tokens", args.max_tokens), ("--max-sequences", args.max_sequences),
                          ("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                          ("--max-body-bytes", args.max_body_bytes), ("--max-connections", args.max_connections)):
        if value <= 0:
            raise OptionError(f"{option} must be a positive integer, got {value}")
    for option, seconds in (("--request-timeout", args.request_timeout), ("--keep-alive-timeout",
                            args.keep_alive_timeout), ("--shutdown-timeout", args.shutdown_timeout),
                           ("--body-timeout", args.body_timeout), ("--header-timeout", args.header_timeout)):
        if not seconds >= 0:
            raise OptionError(f"{option} must be a number of seconds >= 0, got {seconds}")
    keys = api_keys(args)
    if not 0 <= args.port <= 65535:
        raise OptionError(f"--port must be in 0..65535, got {args.port}")
    # Bind first: a taken port is one clear line before the model loads, not a traceback after.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise OptionError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    with file_access_errors():
        engine = load_engine(args)
    name = getattr(args, "model_name", None) or model_name(args.checkpoint)
    host, port = sock.getsockname()[:2]
    limits = Limits(max_tokens=args.max_tokens, max_rows=args.max_sequences, max_batch=args.max_batch,
                    max_queue=args.max_queue, timeout=args.request_timeout or None, max_body=args.max_body_bytes,
                    body_timeout=args.body_timeout)
    app = create_app(engine, name, limits, cors_origins=args.cors_origin, api_keys=keys,
                     allowed_hosts=allowed_hosts(host, args.allowed_host))
    shown = f"[{host}]" if ":" in host else host
    print(f"simplegpt serve: '{name}' on http://{shown}:{port} (playground: /, API: /v1, Ctrl-C stops)",
          file=sys.stderr, flush=True)
    if not keys and not ipaddress.ip_address(host).is_loopback:
        print(f"simplegpt serve: warning: {host} is reachable from other machines and no API key is set: anyone who "
              "can reach it can use it (set --api-key, SIMPLEGPT_API_KEY or --api-key-file)", file=sys.stderr,
              flush=True)
    if args.access_log:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        access = logging.getLogger("simplegpt.serve")
        access.addHandler(handler)
        access.setLevel(logging.INFO)
    http = header_timeout_protocol(args.header_timeout) if args.header_timeout else "auto"
    # uvicorn cancels what still runs at its own timeout, mid-response and with tracebacks; the requests
    # are stopped first (stop_requests), and its timeout is only a backstop for a connection that hangs.
    seconds = args.shutdown_timeout
    server = graceful_server_class()(uvicorn.Config(app, log_level="warning", limit_concurrency=args.max_connections,
                                                    timeout_keep_alive=args.keep_alive_timeout, http=http,
                                                    timeout_graceful_shutdown=seconds + SHUTDOWN_BACKSTOP))

    def stop_requests() -> None:
        stopped = app.state.server.scheduler.stop_all(f"the server is shutting down and its --shutdown-timeout "
                                               f"({seconds:g} s) ran out before this request finished; retry")
        if stopped:
            print(f"simplegpt serve: --shutdown-timeout ({seconds:g} s) ran out: {stopped} running request(s) "
                  "stopped", file=sys.stderr, flush=True)

    server.stop_requests = (seconds, stop_requests)
    server.run(sockets=[sock])
    return 0


SHUTDOWN_BACKSTOP = 5.0  # seconds after --shutdown-timeout at which uvicorn cancels what still runs


def graceful_server_class():
    """uvicorn.Server whose SIGTERM is an ordinary, graceful end (exit 0): uvicorn re-raises a
    captured SIGTERM after its shutdown, so that a process killed by it looks killed. Its
    stop_requests, (seconds, callback), has the callback called that long after the shutdown
    begins, on the event loop, unless it ended first."""
    import asyncio
    import signal

    import uvicorn

    class GracefulServer(uvicorn.Server):
        stop_requests: tuple[float, Callable[[], None]] | None = None

        def handle_exit(self, sig, frame) -> None:
            if sig == signal.SIGTERM:
                self.should_exit = True  # not recorded: nothing to re-raise once the requests finished
            else:
                super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            timer = None
            if self.stop_requests is not None:
                timer = asyncio.get_running_loop().call_later(*self.stop_requests)
            try:
                await super().shutdown(sockets)
            finally:
                if timer is not None:
                    timer.cancel()

    return GracefulServer


def api_keys(args: argparse.Namespace) -> list[str]:
    """The keys from --api-key, SIMPLEGPT_API_KEY and --api-key-file (OptionError for a file that
    cannot be read or holds none)."""
    keys = [k for k in args.api_key if k] + ([os.environ["SIMPLEGPT_API_KEY"]]
                                              if os.environ.get("SIMPLEGPT_API_KEY") else [])
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise OptionError(f"cannot read --api-key-file {args.api_key_file}: {getattr(e, 'strerror', None) or e}") \
                from None
        found = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not found:
            raise OptionError(f"--api-key-file {args.api_key_file} holds no key (one a line)")
        keys += found
    return keys


def allowed_hosts(host: str, extra: list[str]) -> list[str] | None:
    """The Host names a loopback server answers to (None: any, for a server open to the network,
    whose clients use names it cannot know)."""
    if not ipaddress.ip_address(host).is_loopback:
        return [*extra] or None
    return ["localhost", "127.0.0.1", "::1", host, *extra]
