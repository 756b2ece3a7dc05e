"""A byte-level BPE trained on the corpus (`simplegpt prepare --tokenizer bpe:N`) against GPT-2's BPE
and characters, in one run:

    python bench/tokenizer.py                              # ../shared/data/tinyshakespeare.txt, 60 s per model
    python bench/tokenizer.py --budget 5 --vocab 1024      # a quick check that it works
    python bench/tokenizer.py --data corpus.txt --budget 300 --n-layer 6 --n-embd 384

The text (a UTF-8 file) is split at a line end: the first 90 % is the corpus, the last 10 % the
held-out text, which no tokenizer and no model sees before it is scored.

1. Compression: the BPE of --vocab tokens is trained on the corpus (timed: `tokenizers`' trainer,
   all cores), then bytes per token of the held-out text with it and with GPT-2's 50,257 tokens.
2. Learning: for each of char, GPT-2 and the trained BPE the corpus is prepared with that tokenizer
   and `simplegpt train` runs with the same model shape and settings for --budget seconds of wall
   clock from its first step (started as a process, stopped by SIGINT, which saves its last
   checkpoint; Python's start and the data loading are not counted). The checkpoint's bits per byte are then
   measured on the first --eval-bytes of the held-out text (the same bytes for all three).

Prints a table; --json writes the figures as JSON too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simplegpt.checkpoint import load_checkpoint  # noqa: E402
from simplegpt.data.prepare import parse_size, prepare_corpus  # noqa: E402
from simplegpt.evaluation.perplexity import evaluate_text  # noqa: E402
from simplegpt.hf_tokenizer import train_bpe  # noqa: E402
from simplegpt.tokenizer import GPT2Tokenizer  # noqa: E402

DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def split_text(text: str, held_out: float) -> tuple[str, str]:
    """(corpus, held-out): the text cut at the line end nearest to its last `held_out` fraction."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - held_out))) + 1 or int(len(text) * (1 - held_out))
    return text[:cut], text[cut:]


def bytes_per_token(tok, text: str) -> float:
    return len(text.encode("utf-8")) / max(1, len(tok.encode(text)))


def train_for(data_dir: Path, run_dir: Path, budget: float, args: argparse.Namespace) -> int:
    """Runs `simplegpt train` on data_dir for `budget` seconds, then SIGINT (the run saves and ends);
    the step it reached (its last checkpoint's)."""
    cmd = [sys.executable, "-m", "simplegpt", "train", "--data", str(data_dir), "--out_dir", str(run_dir),
           "--overwrite", "--device", "cpu", "--max_iters", "1000000000", "--eval_interval", "1000000000",
           "--eval_iters", "1", "--n_layer", str(args.n_layer), "--n_head", str(args.n_head),
           "--n_embd", str(args.n_embd), "--block_size", str(args.block_size), "--batch_size", str(args.batch_size),
           "--lr", str(args.lr), "--min_lr", str(args.lr / 10), "--warmup_iters", "20", "--seed", "0",
           "--log_interval", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    # The clock starts at the first step's record (log_interval 1): Python's start, loading the data
    # and building the model are not counted, for no tokenizer.
    while proc.poll() is None and not (metrics.is_file() and metrics.stat().st_size):
        time.sleep(0.05)
    try:
        proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    if not (run_dir / "last").is_dir():
        raise SystemExit(f"the training run in {run_dir} saved no checkpoint:\n{err[-2000:]}")
    return int(json.loads((run_dir / "last" / "config.json").read_text(encoding="utf-8"))["step"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_TEXT, help="a UTF-8 text file")
    p.add_argument("--vocab", type=int, default=8192, help="the trained BPE's size (bpe:N)")
    p.add_argument("--tokenizer-sample", default=None, help="train the BPE on the corpus's first SIZE bytes only")
    p.add_argument("--held-out", type=float, default=0.1, help="fraction of the text held out")
    p.add_argument("--budget", type=float, default=60.0, help="seconds of wall clock for each model's training")
    p.add_argument("--eval-bytes", default="50kB", help="bytes of the held-out text the models are scored on")
    p.add_argument("--tokenizers", default="char,gpt2,bpe", help="which of char, gpt2, bpe to train models for")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args()

    text = args.data.read_text(encoding="utf-8")
    corpus, held = split_text(text, args.held_out)
    sample = parse_size(args.tokenizer_sample) if args.tokenizer_sample else None
    train_text = corpus if sample is None else corpus.encode("utf-8")[:sample].decode("utf-8", "ignore")
    start = time.perf_counter()
    bpe = train_bpe([train_text], args.vocab)
    train_s = time.perf_counter() - start
    gpt2 = GPT2Tokenizer()
    result = {"data": str(args.data), "corpus_bytes": len(corpus.encode()), "held_out_bytes": len(held.encode()),
              "bpe_vocab": bpe.vocab_size, "bpe_train_s": round(train_s, 2),
              "bytes_per_token": {"bpe": round(bytes_per_token(bpe, held), 3),
                                  "gpt2": round(bytes_per_token(gpt2, held), 3)},
              "budget_s": args.budget, "models": {}}
    print(f"{args.data.name}: corpus {result['corpus_bytes']:,} bytes, held out {result['held_out_bytes']:,} bytes")
    print(f"trained BPE: {bpe.vocab_size:,} tokens in {train_s:.2f} s")
    print(f"bytes/token on held-out text: trained BPE {result['bytes_per_token']['bpe']:.3f}, "
          f"GPT-2 (50,257) {result['bytes_per_token']['gpt2']:.3f}")

    eval_text = held.encode("utf-8")[:parse_size(args.eval_bytes)].decode("utf-8", "ignore")
    with tempfile.TemporaryDirectory(prefix="bench_tokenizer_") as tmp:
        tmp = Path(tmp)
        (tmp / "corpus.txt").write_text(corpus, encoding="utf-8")
        for name in [n.strip() for n in args.tokenizers.split(",") if n.strip()]:
            tokenizer = {"char": "char", "gpt2": "gpt2", "bpe": bpe}[name]
            meta = prepare_corpus(str(tmp / "corpus.txt"), tmp / f"data_{name}", tokenizer, progress=False)
            step = train_for(tmp / f"data_{name}", tmp / f"run_{name}", args.budget, args)
            ck = load_checkpoint(tmp / f"run_{name}" / "last")
            scored = evaluate_text(ck.model, ck.tokenizer, eval_text, context=args.block_size)
            params = sum(q.numel() for q in ck.model.parameters())
            result["models"][name] = {"vocab": meta["vocab_size"], "params": params, "steps": step,
                                      "bits_per_byte": round(scored.bits_per_byte, 4)}
            print(f"{name:>5}: vocab {meta['vocab_size']:>6,}  params {params:>10,}  steps {step:>6}  "
                  f"held-out bits/byte {scored.bits_per_byte:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
