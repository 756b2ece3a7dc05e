"""DDP on a CPU: 2 torchrun processes of 1 thread each against 1 process of 2 threads, same run.

    python bench/ddp_cpu.py                          # 4 layers, 128 wide, block 64, 24 sequences per step
    python bench/ddp_cpu.py --steps 200 --rounds 5
    python bench/ddp_cpu.py --steps 4 --rounds 1 --n_layer 1 --n_embd 32   # a check that it runs

Both sides are real `simplegpt train` processes on the same prepared corpus (--corpus, by default the
embedded Shakespeare plays, character tokens) and the same config: the same model, --batch_size
sequences per micro-batch and --grad_accum_steps micro-batches per optimizer step *over all
processes* (simplegpt's global-batch rule), so both take optimizer steps of the same tokens:

- DDP: `python -m torch.distributed.run --standalone --nproc_per_node 2 -m simplegpt train ...
  --num_threads 1` (gloo; each rank computes grad_accum_steps / 2 micro-batches, gradients
  all-reduced once per step);
- one process: `python -m simplegpt train ... --num_threads 2` (by default on a CPU the trainer
  splits each batch over its threads, cpu_shards; --cpu-shards sets it for both sides).

The figure is the tokens/s the trainer writes to metrics.jsonl (rank 0 alone writes under torchrun),
the median of its log windows after the first (warm-up); the sides alternate in --rounds rounds,
each going first in turn, so that load from other processes falls on both alike. Prints each round,
the medians, and the ratio DDP / one process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simplegpt.data.prepare import prepare_corpus  # noqa: E402


def train_args(args: argparse.Namespace, data: Path, out: Path, threads: int) -> list[str]:
    """`simplegpt train` options shared by both sides; only the run folder and the threads differ."""
    values = {"data": data, "n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
              "block_size": args.block_size, "batch_size": args.batch_size, "grad_accum_steps": args.grad_accum_steps,
              "max_iters": args.steps, "log_interval": max(1, args.steps // 10), "eval_interval": args.steps,
              "eval_iters": 1, "sample_tokens": 0, "warmup_iters": 0, "lr": 1e-3, "device": "cpu",
              "num_threads": threads, "cpu_shards": args.cpu_shards, "plot": "false", "tensorboard": "false",
              "out_dir": out}
    return ["train", *[a for k, v in values.items() for a in (f"--{k}", str(v))], "--overwrite", "--quiet"]


def rate(out: Path) -> tuple[float, int]:
    """The median tokens/s of the run's log windows after the first, and the tokens of one step."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    rates = [r["tok_per_s"] for r in train]
    per_step = train[0]["tokens"] // train[0]["step"]
    return statistics.median(rates[1:] if len(rates) > 1 else rates), per_step


def run(command: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(command)}\n{proc.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs both sides, which go first in turn")
    ap.add_argument("--corpus", default="shakespeare", help="a text corpus (simplegpt prepare's sources)")
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_head", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=128)
    ap.add_argument("--block_size", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=12, help="sequences per micro-batch")
    ap.add_argument("--grad_accum_steps", type=int, default=2,
                    help="micro-batches per optimizer step over all processes (even: 2 ranks share them)")
    ap.add_argument("--cpu-shards", type=int, default=0,
                    help="the trainer's cpu_shards on both sides (0 = its default: one share per thread)")
    args = ap.parse_args()
    if args.grad_accum_steps % 2:
        ap.error("--grad_accum_steps must be even: 2 processes split each step's micro-batches")

    work = Path(tempfile.mkdtemp(prefix="simplegpt-ddp-cpu-"))
    try:
        data = work / "data"
        prepare_corpus(args.corpus, data, "char", progress=False, workers=1)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        sides = {
            "2 processes x 1 thread (DDP)": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node", "2", "-m", "simplegpt",
                                             *train_args(args, data, work / "ddp", 1)],
            "1 process x 2 threads": [sys.executable, "-m", "simplegpt", *train_args(args, data, work / "one", 2)],
        }
        outs = dict(zip(sides, (work / "ddp", work / "one")))
        results: dict[str, list[float]] = {name: [] for name in sides}
        print(f"model: {args.n_layer} layers, {args.n_head} heads, {args.n_embd} wide, block {args.block_size}; "
              f"{args.batch_size} x {args.grad_accum_steps} sequences per step; {args.steps} steps per run", flush=True)
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            per_step = {}
            for name in order:
                run(sides[name], env)
                tok_s, per_step[name] = rate(outs[name])
                results[name].append(tok_s)
            if len(set(per_step.values())) != 1:
                sys.exit(f"the two sides took steps of different sizes: {per_step} tokens; not the same global batch")
            print(f"round {r + 1}: " + ", ".join(f"{name} {results[name][-1]:,.0f} tok/s" for name in sides), flush=True)
        ddp, one = (statistics.median(results[name]) for name in sides)
        for name in sides:
            print(f"{name:>30}: {statistics.median(results[name]):,.0f} tok/s (median of {args.rounds} round{'s' if args.rounds != 1 else ''})")
        print(f"{'ratio DDP / one process':>30}: {ddp / one:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
