"""The engine's command-line options (--quantize, --compile, --device, --threads) and the Engine they
load: one definition for every command that runs a checkpoint's engine (generate, serve)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError, OptionError

if TYPE_CHECKING:
    from .engine import Engine


def model_name(checkpoint: str) -> str:
    """The name a checkpoint is shown and served under: out/run/best -> run-best (which run, and which
    of its checkpoints); any other folder: its name."""
    folder = Path(checkpoint).resolve()
    return f"{folder.parent.name}-{folder.name}" if folder.name in ("best", "last") else folder.name


def add_engine_arguments(p: argparse.ArgumentParser, long_running: str) -> None:
    """Adds --quantize, --compile, --device and --threads to p; long_running: where compiling pays off,
    for --help."""
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: int8 weights for the linear layers (CPU; ~4x less memory read per token)")
    p.add_argument("--compile", action="store_true",
                   help="run each decode step as one torch.compile'd function over a static KV cache (CUDA graphs "
                        "on a GPU), in place of the native CPU kernels; helps on GPUs and in long-running "
                        f"processes ({long_running}), since the first tokens of each batch size wait for the "
                        "compilation (seconds to a minute); needs a C++ compiler on the CPU; not with --quantize int8")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads for decoding; 0 (the default): OMP_NUM_THREADS where set, else the cores other "
                        "processes leave idle, measured for 0.2 s at start (threads beyond the idle cores wait for "
                        "the busy ones and slow decoding down many times)")


def check_engine_arguments(args: argparse.Namespace) -> None:
    """Raises OptionError for engine options that cannot go together; cheap, so call it before loading."""
    if args.threads < 0:
        raise OptionError(f"--threads must be 0 (the idle cores) or a number of threads, got {args.threads}")
    if args.compile and args.quantize == "int8":
        raise OptionError("--compile does not work with --quantize int8 (its int8 kernels do not compile): "
                          "choose one")


def load_engine(args: argparse.Namespace, quiet: bool = True) -> Engine:
    """The Engine that loads and owns args.checkpoint (Engine.from_checkpoint) with add_engine_arguments'
    options, the int8 sizes on stderr unless quiet; on the CPU it sets torch's threads (--threads, else
    decode_threads()'s choice). Raises CheckpointError for a checkpoint that
    cannot be loaded or has no tokenizer, DeviceError for a device this machine does not have,
    OptionError for int8 off the CPU."""
    import torch

    from .accel.cpu.threads import decode_threads
    from .devices import resolve_device
    from .engine import Engine

    device = resolve_device("cpu" if args.device == "auto" and args.quantize == "int8" else args.device)
    if args.quantize == "int8" and device.type != "cpu":
        raise OptionError(f"--quantize int8 runs on the CPU only: use --device cpu (or drop --quantize on {device})")
    if device.type == "cpu":
        torch.set_num_threads(decode_threads(args.threads))
    engine = Engine.from_checkpoint(args.checkpoint, device=device, quantize=args.quantize, compile=args.compile)
    if engine.tokenizer is None:
        raise CheckpointError(f"{args.checkpoint} has no tokenizer/ directory: cannot turn text into tokens")
    if engine.quant_report is not None and not quiet:
        report = engine.quant_report
        print(f"[int8: linear weights {report.fp32_bytes / 2**20:.0f} MiB -> {report.int8_bytes / 2**20:.0f} MiB]",
              file=sys.stderr)
    return engine
