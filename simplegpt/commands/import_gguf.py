"""simplegpt import-gguf: a GGUF file (GGUF's gpt2, llama or qwen3 architecture) as a simplegpt checkpoint."""

from __future__ import annotations

import argparse

from ..errors import file_access_errors

HELP = "convert a GGUF file (gpt2, llama or qwen3 architecture) into a simplegpt checkpoint"
DESCRIPTION = (
    "Convert a GGUF file of GGUF's gpt2, llama or qwen3 architecture (as export-gguf or llama.cpp's converter write "
    "it) into a simplegpt checkpoint directory: f16 and q8_0 weights come back as float32, the "
    "tokenizer as GPT-2's, bytes, characters or a byte-level BPE, the chat template as the "
    'checkpoint\'s. Needs the gguf extra (pip install "simplegpt-toolkit[gguf]").'
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="FILE.gguf", help="GGUF file to read")
    p.add_argument("out", metavar="OUT", help="simplegpt checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it already exists and is not empty (otherwise refuse)")


def run(args: argparse.Namespace) -> int:
    from ..gguf_import import import_gguf

    with file_access_errors():
        ck = import_gguf(args.source, args.out, overwrite=args.overwrite)
    print(f"imported {args.source} -> {ck.path}: {ck.model.num_parameters():,} parameters, "
          f"n_layer={ck.config.n_layer} n_embd={ck.config.n_embd} n_positions={ck.config.n_positions}, "
          f"tokenizer {ck.tokenizer.kind}")
    return 0
