"""simplegpt export-gguf: a simplegpt checkpoint as one GGUF file for llama.cpp, Ollama and LM Studio."""

from __future__ import annotations

import argparse

from ..cli import add_checkpoint_argument
from ..errors import file_access_errors

HELP = "write a checkpoint as a GGUF file (llama.cpp, Ollama, LM Studio)"
DESCRIPTION = (
    "Write a simplegpt checkpoint as one GGUF file: weights (f32, f16 or q8_0), hyperparameters, the "
    "tokenizer as a byte-level BPE vocabulary with its merges and pre-tokenizer, and the chat template when "
    "the checkpoint has one, so llama-server, Ollama and LM Studio run it. Needs the gguf extra "
    '(pip install "simplegpt-toolkit[gguf]"). See docs/export.md.'
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..gguf_export import TYPES

    add_checkpoint_argument(p, "simplegpt checkpoint directory")
    p.add_argument("out", metavar="OUT.gguf", help="GGUF file to write")
    p.add_argument("--type", default="f32", choices=TYPES,
                   help="how weights are stored: f32, f16, or q8_0 (8-bit blocks of 32 with an f16 scale); "
                        "vectors and learned positions stay f32")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if it already exists (otherwise refuse)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress bars (default: for models of 256 MB of f32 weights or more)")


def run(args: argparse.Namespace) -> int:
    from ..gguf_export import export_gguf

    with file_access_errors():
        result = export_gguf(args.checkpoint, args.out, type=args.type, overwrite=args.overwrite,
                             progress=args.progress)
    template = ", with its chat template" if result.chat_template else ""
    print(f"exported {args.checkpoint} -> {result.path}: GGUF {result.architecture}, {result.type}, "
          f"{result.tensors} tensors, {result.bytes / 1e6:.1f} MB{template}")
    return 0
