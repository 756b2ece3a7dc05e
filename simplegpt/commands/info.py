"""simplegpt info: what a checkpoint holds."""

from __future__ import annotations

import argparse
import json

from ..cli import add_checkpoint_argument
from ..errors import file_access_errors

HELP = "show a checkpoint's model config, parameter count, tokenizer and metadata"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(p, "checkpoint directory", unless="system")
    p.add_argument("--system", action="store_true",
                   help="print which CPU kernels this machine uses and why (no checkpoint needed)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import describe_checkpoint

    if args.system:
        from ..accel.cpu.lib import report

        print(report())
        if args.checkpoint is None:
            return 0

    with file_access_errors():
        ck = describe_checkpoint(args.checkpoint)  # config, shapes and tokenizer: no model is built
    info = {
        "path": str(ck.path),
        "model": ck.config.to_dict(),
        "parameters": ck.parameters,
        "tokenizer": ck.tokenizer,
        **{k: v for k, v in ck.metadata.items() if k in ("step", "metrics", "tokens_seen")},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = ck.config
    lines = {
        "path": info["path"],
        "model": f"{c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, context {c.n_positions}, "
                 f"vocab {c.vocab_size}, dropout {c.dropout}, bias {c.bias}",
        "parameters": f"{info['parameters']:,}",
        "tokenizer": info["tokenizer"] or "none",
    }
    if "step" in info:
        lines["step"] = f"{info['step']:,}"
    if "tokens_seen" in info:
        lines["tokens seen"] = f"{info['tokens_seen']:,}"
    for name, value in (info.get("metrics") or {}).items():
        if isinstance(value, float):
            lines[name.replace("_", " ")] = f"{value:.4f}"
    for k, v in lines.items():
        print(f"{k:>13}: {v}")
    return 0
