"""LoRA against full fine-tuning: memory and tokens/s of the same fine-tune, on the same model and data.

A base model (default: 4 layers, 256 wide, block 128, GPT-2's 50,257-token vocabulary, whose
embedding dominates its 16.4M parameters, as in the small models LoRA is for) is saved once; then
`simplegpt.trainer.train` fine-tunes it from that checkpoint twice, each in a fresh process: every
weight (full), and rank-16 adapters on all the blocks' linear layers (--lora). Each process reports
its peak RSS, the RSS it had before train() (imports, nothing trained), and the median tokens/s of
the trainer's log windows (the first, with warm-up, left out). On a CPU, full fine-tuning of a GPT-2
model runs the fused training kernels (the whole loss without materializing the logits), which
LoRA's wrapped layers leave to PyTorch; --kernels off compares both on PyTorch's ops. The full and
LoRA processes alternate for --rounds rounds, so load from other processes hits both alike. Prints
each figure and the LoRA / full ratios.

    python bench/lora.py [--steps 40] [--rounds 2] [--rank 16] [--n_layer 4] [--n_embd 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_now() -> int:
    """This process's resident set size in bytes (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args: argparse.Namespace) -> None:
    """One fine-tune (args.mode: full or lora) in this process; prints a JSON line of its figures."""
    from simplegpt.config import TrainConfig
    from simplegpt.trainer import train

    cfg = TrainConfig(**json.loads(args.cfg))
    if args.mode == "lora":
        cfg = cfg.replace(lora=args.rank)
    before = rss_now()
    train(cfg, overwrite=True, progress=False, log=lambda s: None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    records = [json.loads(ln) for ln in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tok_per_s"] for r in records if r["kind"] == "train"][1:]
    print(json.dumps({"peak_rss": peak, "rss_before": before, "tok_per_s": statistics.median(rates)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the trainer's choice)")
    p.add_argument("--kernels", choices=("on", "off"), default="on",
                   help="off: both fine-tunes on PyTorch's ops alone (SIMPLEGPT_NATIVE=0); on, full fine-tuning "
                        "takes the fused CPU training kernels, which LoRA's wrapped layers leave to PyTorch")
    p.add_argument("--mode", choices=("full", "lora"), help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        return child(args)

    from simplegpt.config import TrainConfig
    from simplegpt.trainer import train

    work = Path(tempfile.mkdtemp(prefix="simplegpt-bench-lora-"))
    shape = dict(n_layer=args.n_layer, n_head=max(1, args.n_embd // 64), n_embd=args.n_embd,
                 block_size=args.block_size)
    common = dict(data="shakespeare", tokenizer="gpt2", data_dir=str(work / "data"), batch_size=args.batch_size,
                  eval_iters=1, sample_tokens=0, plot=False, tensorboard=False, num_threads=args.threads,
                  log_interval=5)
    # the base: a random model of the shape, saved after one step (the data is prepared once, here)
    train(TrainConfig(**common, **shape, max_iters=1, out_dir=str(work / "base")), overwrite=True,
          progress=False, log=lambda s: None)
    ft = {**common, "init_from": str(work / "base" / "last"), "block_size": args.block_size, "max_iters": args.steps,
          "eval_interval": args.steps, "lr": 1e-3, "warmup_iters": 0}
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(args.rounds):
        for mode in runs:
            cfg = json.dumps({**ft, "out_dir": str(work / mode)})
            env = {**os.environ, **({"SIMPLEGPT_NATIVE": "0"} if args.kernels == "off" else {})}
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--cfg", cfg, "--rank", str(args.rank)],
                                 capture_output=True, text=True, check=True, env=env)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def figure(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    print(f"shape: {shape}, GPT-2 vocabulary, batch {args.batch_size} x {args.block_size} tokens, {args.steps} steps, "
          f"LoRA rank {args.rank} on attn,mlp; CPU kernels {args.kernels}; {args.rounds} rounds, medians")
    print(f"{'':8} {'tokens/s':>10} {'peak RSS MB':>12} {'RSS growth in train() MB':>25}")
    for mode in runs:
        growth = figure(mode, "peak_rss") - figure(mode, "rss_before")
        print(f"{mode:8} {figure(mode, 'tok_per_s'):10.0f} {figure(mode, 'peak_rss') / 1e6:12.0f} {growth / 1e6:25.0f}")
    growth = {m: figure(m, "peak_rss") - figure(m, "rss_before") for m in runs}
    print(f"LoRA / full: tokens/s x{figure('lora', 'tok_per_s') / figure('full', 'tok_per_s'):.2f}, peak RSS "
          f"x{figure('lora', 'peak_rss') / figure('full', 'peak_rss'):.2f}, RSS growth in train() "
          f"x{growth['lora'] / growth['full']:.2f}")


if __name__ == "__main__":
    main()
