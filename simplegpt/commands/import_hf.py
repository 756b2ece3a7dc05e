"""simplegpt import-hf: a Hugging Face GPT-2, Llama or Qwen3 model as a simplegpt checkpoint."""

from __future__ import annotations

import argparse
import sys

from ..cli import add_output_arguments
from ..errors import file_access_errors

HELP = "convert a Hugging Face GPT-2, Llama or Qwen3 model (local directory or hub name) into a simplegpt checkpoint"
DESCRIPTION = (
    "Convert a Hugging Face GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM into a simplegpt checkpoint "
    "directory, weights bit-identical. "
    "A local directory needs config.json and model.safetensors (or pytorch_model.bin) and works "
    "without transformers; a hub name such as 'gpt2' is downloaded by transformers (the 'hf' extra) "
    "and needs the hub to be reachable. Models with GPT-2's vocabulary get the GPT-2 tokenizer, others the "
    "folder's tokenizer.json (read with Hugging Face tokenizers)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="Hugging Face model directory (config.json + weights) or hub name, e.g. gpt2")
    add_output_arguments(p, "simplegpt checkpoint directory to write")


def run(args: argparse.Namespace) -> int:
    from ..hf import import_hf

    with file_access_errors():
        ck = import_hf(args.source, args.out, overwrite=args.overwrite)
    tok = ck.tokenizer.kind if ck.tokenizer else "none"
    print(f"imported {args.source} -> {ck.path}: {ck.model.num_parameters():,} parameters, "
          f"n_layer={ck.config.n_layer} n_embd={ck.config.n_embd} n_positions={ck.config.n_positions}, "
          f"tokenizer {tok}")
    if ck.tokenizer is None:
        print(f"simplegpt import-hf: warning: the model's vocabulary ({ck.config.vocab_size} tokens) is not GPT-2's "
              "and its folder has no tokenizer.json, so the checkpoint has no tokenizer and cannot be used on text "
              "(export-hf still works)",
              file=sys.stderr)
    return 0
