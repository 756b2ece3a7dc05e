"""simplegpt serve: an OpenAI-compatible HTTP API and a web playground for a checkpoint."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

HELP = "serve a checkpoint over an OpenAI-compatible HTTP API, with a web playground"
DESCRIPTION = (
    "Serve a checkpoint over HTTP: /v1/completions, /v1/chat/completions and /v1/models in the shapes of "
    "OpenAI's API (its official clients work with base_url=http://HOST:PORT/v1 and any api_key), and a "
    "playground page at /. Needs the serve extra: pip install -e '.[serve]'. Generations run one at a "
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
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: int8 weights for the linear layers (CPU; ~4x less memory read per token)")
    p.add_argument("--compile", action="store_true",
                   help="compiled decode steps over a static KV cache (CUDA graphs on a GPU); the first request "
                        "of each batch size waits for the compilation; not with --quantize int8")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..server import create_app
    except ModuleNotFoundError as e:
        raise ImportError(f"simplegpt serve needs {e.name}: pip install -e '.[serve]'") from None
    from ..checkpoint import load_checkpoint
    from ..devices import resolve_device
    from ..engine import Engine
    from ..errors import CheckpointError

    if args.compile and args.quantize == "int8":
        raise ValueError("--compile does not work with --quantize int8 (its int8 kernels do not compile): choose one")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    # Bind first: a taken port is one clear line before the model loads, not a traceback after.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    device = "cpu" if args.device == "auto" and args.quantize == "int8" else resolve_device(args.device)
    ck = load_checkpoint(args.checkpoint, device=device)
    if ck.tokenizer is None:
        raise CheckpointError(f"{args.checkpoint} has no tokenizer/ directory: cannot turn text into tokens")
    if args.quantize == "int8":
        from ..quantize import quantize_int8

        quantize_int8(ck.model)
    folder = Path(args.checkpoint).resolve()
    # out/run/best -> "run-best": the run's name, not only which of its checkpoints
    run_checkpoint = folder.name in ("best", "last")
    name = getattr(args, "model_name", None) or (f"{folder.parent.name}-{folder.name}" if run_checkpoint else folder.name)
    app = create_app(Engine(ck.model, ck.tokenizer, compile=args.compile), name)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"simplegpt serve: '{name}' on http://{shown}:{port} (playground: /, API: /v1, Ctrl-C stops)",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
    return 0
