"""simplegpt serve: an OpenAI-compatible HTTP API and a web playground for a checkpoint."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from ..engine_options import add_engine_arguments, check_engine_arguments, load_engine
from ..errors import MissingDependencyError, OptionError, file_access_errors

HELP = "serve a checkpoint over an OpenAI-compatible HTTP API, with a web playground"
DESCRIPTION = (
    "Serve a checkpoint over HTTP: /v1/completions, /v1/chat/completions and /v1/models in the shapes of "
    "OpenAI's API (its official clients work with base_url=http://HOST:PORT/v1 and any api_key), and a "
    "playground page at /. Needs the serve extra: pip install 'simplegpt-toolkit[serve]'. Generations run one at a "
    "time, each on every core. Binds to 127.0.0.1 by default; --host 0.0.0.0 opens it to the network "
    "(there is no authentication)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0 = any free port)")
    p.add_argument("--model-name", default=argparse.SUPPRESS,
                   help="the model id clients send and /v1/models lists (default: the checkpoint's folder name; "
                        "out/RUN/best is served as RUN-best)")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="the most new tokens a request may ask for, per sequence (a generation holds the server)")
    p.add_argument("--max-sequences", type=int, default=64,
                   help="the most sequences (prompts x n) one request may ask for")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from this origin (e.g. http://localhost:3000, or '*' for any) call the API "
                        "from a browser; repeat for several; none by default")
    add_engine_arguments(p, "a server")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve import create_app
    except ModuleNotFoundError as e:
        if (e.name or "").startswith("simplegpt"):
            raise
        raise MissingDependencyError(f"simplegpt serve needs {e.name}: "
                                     "pip install 'simplegpt-toolkit[serve]'") from None
    check_engine_arguments(args)
    for option, value in (("--max-tokens", args.max_tokens), ("--max-sequences", args.max_sequences)):
        if value <= 0:
            raise OptionError(f"{option} must be a positive integer, got {value}")
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
    folder = Path(args.checkpoint).resolve()
    # out/run/best -> "run-best": the run's name, not only which of its checkpoints
    run_checkpoint = folder.name in ("best", "last")
    name = getattr(args, "model_name", None) or (f"{folder.parent.name}-{folder.name}" if run_checkpoint else folder.name)
    app = create_app(engine, name, max_tokens=args.max_tokens, max_rows=args.max_sequences,
                     cors_origins=args.cors_origin)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"simplegpt serve: '{name}' on http://{shown}:{port} (playground: /, API: /v1, Ctrl-C stops)",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
    return 0
