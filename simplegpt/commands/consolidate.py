"""simplegpt consolidate: a sharded (FSDP2) checkpoint as the usual single-process checkpoint."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..cli import add_checkpoint_argument, add_output_arguments
from ..errors import file_access_errors

HELP = "turn a sharded (FSDP2) checkpoint into the usual checkpoint that generate, serve, eval and export-hf read"
DESCRIPTION = (
    "Read a checkpoint saved by 'torchrun ... simplegpt train' with parallel = \"fsdp\" (its dcp/ folder "
    "holds each rank's shards, written with torch.distributed.checkpoint) in this one process, and write "
    "DST as the usual checkpoint directory: model.safetensors, config.json (the model config, step and "
    "metrics) and tokenizer/. Any number of ranks may have saved SRC; no process group is needed. DST is "
    "written beside it atomically and gets no training state: to continue training, resume from SRC "
    "itself, on any number of processes."
)
SUFFIX = "-consolidated"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(p, "SRC: the sharded checkpoint directory (a run folder's last/ or best/)", then="out")
    add_output_arguments(p, f"checkpoint directory to write (default: SRC{SUFFIX}, beside SRC)", metavar="DST",
                         optional=True)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint
    from ..training.fsdp import consolidate

    src = Path(args.checkpoint)
    base = src if src.name not in ("", "..") else src.resolve()  # "." and ".." name no folder to put DST beside
    dst = Path(args.out) if hasattr(args, "out") else base.with_name(base.name + SUFFIX)
    started = time.perf_counter()
    with file_access_errors():
        out = consolidate(src, dst, overwrite=args.overwrite, progress=lambda line: print(f"{line} ...", flush=True))
        ck = load_checkpoint(out)  # what generate, serve, eval and export-hf will do with it
    step = f", step {ck.metadata['step']:,}" if isinstance(ck.metadata.get("step"), int) else ""
    size = (out / "model.safetensors").stat().st_size
    print(f"consolidated {src} -> {out}: {ck.model.num_parameters():,} parameters{step}, "
          f"model.safetensors {size / 2**20:.1f} MiB, in {time.perf_counter() - started:.1f} s")
    return 0
