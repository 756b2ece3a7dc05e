"""simplegpt export-hf: a simplegpt checkpoint as a Hugging Face model directory."""

from __future__ import annotations

import argparse
import sys

from ..cli import add_checkpoint_argument, add_output_arguments
from ..errors import file_access_errors

HELP = "write a checkpoint as a Hugging Face directory (GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM)"
DESCRIPTION = (
    "Write a simplegpt checkpoint as a Hugging Face directory: a GPT2LMHeadModel for GPT-2's architecture, a "
    "LlamaForCausalLM or Qwen3ForCausalLM for the Llama-style options that map onto one (others are refused, "
    "naming the option; docs/architectures.md): config.json, model.safetensors "
    "and, for GPT-2-tokenizer models, vocab.json, merges.txt, tokenizer_config.json and "
    "special_tokens_map.json, so AutoModelForCausalLM.from_pretrained(OUT) (that class) and "
    "AutoTokenizer.from_pretrained(OUT) load it; a trained BPE (prepare --tokenizer bpe:N) is written "
    "as tokenizer.json and tokenizer_config.json (PreTrainedTokenizerFast). Character and byte "
    "tokenizers have no Hugging Face equivalent: their weights and config are exported, and simplegpt's tokenizer is kept in "
    "OUT/simplegpt_tokenizer/ so import-hf can bring the model back. Does not need transformers. "
    "A LoRA checkpoint (train --lora) is written merged; --adapters-only writes its peft adapter folder instead."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(p, "simplegpt checkpoint directory")
    add_output_arguments(p, "Hugging Face model directory to write")
    p.add_argument("--adapters-only", action="store_true",
                   help="for a checkpoint trained with --lora: write only its adapters, as a peft adapter folder "
                        "(adapter_config.json, adapter_model.safetensors) that peft.PeftModel.from_pretrained loads "
                        "onto the export-hf of its base (GPT-2, Llama or Qwen3: a Llama-style model's fused q|k|v "
                        "and gate|up adapters are split into Hugging Face's layers); without it, the merged weights "
                        "are written (docs/lora.md)")


def run(args: argparse.Namespace) -> int:
    from ..hf import SIMPLEGPT_TOKENIZER_DIR, export_hf

    if args.adapters_only:
        from ..training.lora import export_adapters

        with file_access_errors():
            out = export_adapters(args.checkpoint, args.out, overwrite=args.overwrite)
        print(f"exported the LoRA adapters of {args.checkpoint} -> {out} (peft; load onto the export-hf of its base)")
        return 0
    with file_access_errors():
        result = export_hf(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} -> {result.path}: {', '.join(result.files)}")
    if result.tokenizer is None:
        print("simplegpt export-hf: warning: the checkpoint has no tokenizer; only weights and config were "
              "exported", file=sys.stderr)
    elif not result.tokenizer_exported:
        print(f"simplegpt export-hf: warning: the {result.tokenizer} tokenizer has no Hugging Face equivalent, so "
              f"AutoTokenizer cannot load {result.path} (no vocab.json/merges.txt); {result.model_class} (or "
              f"AutoModelForCausalLM) loads the weights, and simplegpt's tokenizer is kept in {result.path / SIMPLEGPT_TOKENIZER_DIR}/ for "
              "import-hf", file=sys.stderr)
    return 0
