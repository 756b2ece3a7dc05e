"""simplegpt inspect: pictures of what a checkpoint does with a text (attention, predictions, positions)."""

from __future__ import annotations

import argparse

from ..cli import add_checkpoint_argument
from ..errors import CheckpointError, OptionError, file_access_errors

HELP = "draw a checkpoint's attention maps, next-token predictions and positions for a text"
DESCRIPTION = (
    "Run a short text through a checkpoint and draw what the model does with it: an attention map per layer "
    "and head (the text's tokens on both axes), the most likely next tokens after each position, and how "
    "alike its positions look to the model (its learned position embeddings, or with rotary positions their "
    "rotations). Writes PNG files and inspect.npz (the arrays) into --out; "
    "--html also writes inspect.html, one page with every picture inlined, which opens offline. Prints the "
    "model's top predictions at each position."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(p, "checkpoint directory (with its tokenizer)")
    p.add_argument("--text", required=True, help="the text to look at; at most the model's context in tokens")
    p.add_argument("--out", default="inspect", metavar="DIR", help="folder for the pictures (made if missing)")
    p.add_argument("--html", action="store_true", help="also write inspect.html, one self-contained page")
    p.add_argument("--top-k", type=int, default=5, help="next tokens to show at each position")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint
    from ..learn import inspect_text
    from ..learn.output import write_inspection

    if args.top_k < 1:
        raise OptionError(f"--top-k must be at least 1, got {args.top_k}")
    with file_access_errors():
        ck = load_checkpoint(args.checkpoint)
    if ck.tokenizer is None:
        raise CheckpointError(f"{args.checkpoint} has no tokenizer (no tokenizer/ folder), so a text cannot be "
                              "turned into its tokens; inspect a checkpoint saved by simplegpt train or import-hf")
    insp = inspect_text(ck.model, ck.tokenizer, args.text, top_k=args.top_k)
    with file_access_errors():
        written = write_inspection(insp, args.out, with_html=args.html, source=str(args.checkpoint))
    for t, token in enumerate(insp.tokens):
        best = ", ".join(f"{tok} {p:.2f}" for tok, p in zip(insp.top_tokens[t], insp.top_probs[t]))
        print(f"{t:>4} {token:<12} -> {best}")
    print(f"wrote {len(written)} files to {args.out}" + (f" (open {written[-1]})" if args.html else ""))
    return 0
