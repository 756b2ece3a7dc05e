"""simplegpt eval: loss, perplexity and bits per byte of a model on a text."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from ..cli import add_checkpoint_argument
from ..console import count, say
from ..errors import CheckpointError, OptionError, UnknownCharacterError, file_access_errors

HELP = "loss, perplexity and bits per byte of a checkpoint on a text (sliding-window evaluation)"
DESCRIPTION = (
    "Score a text with a model: mean loss per token (nats), perplexity and bits per byte. Texts "
    "longer than the context are scored in windows of --context tokens started --stride tokens apart; "
    "each token is scored once, with at least context - stride tokens of left context (the Hugging Face "
    "perplexity recipe: a smaller stride is slower and gives each token more context)."
)


def _at_least(least: int):
    def parse(value: str) -> int:
        n = int(value)
        if n < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {value}")
        return n

    parse.__name__ = "integer"  # argparse names the type in its error message
    return parse


_positive = _at_least(1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: required options have no default worth printing in --help.
    add_checkpoint_argument(p, "simplegpt checkpoint directory, or a Hugging Face GPT-2, Llama or Qwen3 "
                               "directory or hub name")
    p.add_argument("--data", required=True, default=argparse.SUPPRESS,
                   help="what to score: a dataset directory made by 'simplegpt prepare' (its --split), or any "
                        "corpus prepare accepts: a UTF-8 .txt/.md/.jsonl file, a folder or glob of them, a URL, "
                        "'shakespeare', 'tinyshakespeare' or 'hf:NAME[:CONFIG]'; documents are separated by "
                        "the end-of-text token")
    p.add_argument("--split", default=None,
                   help="split to score; unset means val for a prepared dataset and test for an hf: dataset")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl lines and hf: datasets")
    p.add_argument("--context", type=_at_least(2), default=None,
                   help="window length in tokens; unset means the model's n_positions")
    p.add_argument("--stride", type=_positive, default=None,
                   help="tokens between window starts, 1..context; unset means context // 2")
    p.add_argument("--max-tokens", type=_at_least(2), default=None,
                   help="score only the first N tokens of the data (quick estimates); unset means all")
    p.add_argument("--no-bos", action="store_true",
                   help="do not put the end-of-text token before the first document, so its first token is "
                        "context only (the plain Hugging Face recipe); prepared datasets are used as they are")
    p.add_argument("--batch-size", type=_positive, default=None,
                   help="windows per forward pass; unset means as many as keep the logits near 512 MiB")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda, then mps, then cpu), cpu, cuda, ...")
    p.add_argument("--skip-unknown", action="store_true",
                   help="score the text without the characters a character-level model has no token for (and say "
                        "how many were left out); without it such a character is an error naming it")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..evaluation.perplexity import evaluate_ids, load_eval_tokens
    from ..hf import load_any

    device = resolve_device(args.device)
    ck = load_any(args.checkpoint, device=device)
    if ck.tokenizer is None:
        raise CheckpointError(f"{args.checkpoint} has no tokenizer, so text cannot be scored with it")
    n_positions = ck.config.n_positions
    context = args.context or n_positions
    if context > n_positions:
        raise OptionError(f"--context {context} exceeds the model's n_positions ({n_positions})")
    if args.stride is not None and args.stride > context:
        raise OptionError(f"--stride must be between 1 and the context ({context}), got {args.stride}")
    dropped: Counter[str] = Counter()
    try:
        with file_access_errors():
            ids = load_eval_tokens(args.data, ck.tokenizer, split=args.split, text_field=args.text_field,
                                   bos=not args.no_bos, max_tokens=args.max_tokens, skip_unknown=args.skip_unknown,
                                   dropped=dropped)
    except UnknownCharacterError as e:
        raise UnknownCharacterError(f"{args.data} does not fit the model's tokenizer: {e}; --skip-unknown scores "
                                    "the text without them", chars=e.chars) from None
    result = evaluate_ids(ck.model, ids, ck.tokenizer, context=args.context, stride=args.stride,
                          batch_size=args.batch_size, device=device)
    if dropped:
        n = sum(dropped.values())
        named = ", ".join(f"{c!r} x{k:,}" for c, k in dropped.most_common(5)) + (", ..." if len(dropped) > 5 else "")
        say(f"simplegpt eval: left out {count(n, 'character')} the model's vocabulary lacks "
            f"({len(dropped)} different: {named}); the scores are of the rest of the text")
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "data": str(args.data), **result.to_dict(),
                          "dropped_characters": sum(dropped.values())}))
    else:
        print(f"loss {result.loss:.4f} nats/token | perplexity {result.perplexity:.3f} | "
              f"bits/byte {result.bits_per_byte:.4f} | {result.tokens:,} tokens, {result.bytes:,} bytes, "
              f"{result.windows} windows of {result.context} (stride {result.stride})")
    return 0
