"""Training throughput: simplegpt's trainer vs a Hugging Face GPT2LMHeadModel + AdamW loop.

Both train the same GPT-2-shaped model (default: 4 layers, 4 heads, 128 wide, block 64, batch 12,
character vocabulary of tinyshakespeare) on the same batches, in the same process, alternating in
rounds so that load from other processes hits both alike. simplegpt's figure is the tokens/s its
own `simplegpt.trainer.train` logs (the real loop: sampler, schedule, clipping, fused AdamW, its
native CPU kernels and its split of each batch over the cores, as a user gets them); the reference
is the loop a transformers user writes. Prints tokens/s for both, the ratio and MFU.

    .venv/bin/python bench/train_throughput.py [--steps 100] [--rounds 3] [--threads 2]
    .venv/bin/python bench/train_throughput.py --dtypes float32,bfloat16 [--n_layer 6 --n_embd 384 ...]

--dtypes trains simplegpt alone once per dtype in each round (its `dtype` option: bfloat16 is
torch.autocast on the CPU) on the same batches from the same initial weights, and prints each
dtype's tokens/s and its loss every log interval beside float32's: whether BF16 autocast trains
faster at an equal loss curve.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simplegpt.config import TrainConfig  # noqa: E402
from simplegpt.data.prepare import prepare_corpus  # noqa: E402
from simplegpt.data.samplers import PackedSampler  # noqa: E402
from simplegpt.data.shards import TokenShards  # noqa: E402
from simplegpt.trainer import core_shards, peak_flops, train  # noqa: E402


def simplegpt_round(cfg: TrainConfig, steps: int, log_every: int) -> float:
    """Median tokens/s of the trainer's log windows (the first window, with warm-up, left out)."""
    return simplegpt_run(cfg, steps, log_every)[0]


def simplegpt_run(cfg: TrainConfig, steps: int, log_every: int) -> tuple[float, list[float]]:
    """simplegpt_round's tokens/s, and the training loss at every log step."""
    train(cfg.replace(max_iters=steps, log_interval=log_every), overwrite=True, progress=False, log=lambda s: None)
    records = [json.loads(ln) for ln in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["kind"] == "train"]
    return statistics.median([r["tok_per_s"] for r in records][1:]), [r["loss"] for r in records]


def compare_dtypes(cfg: TrainConfig, dtypes: list[str], rounds: int, steps: int, log_every: int) -> None:
    """simplegpt alone in each dtype, alternating in rounds: tokens/s (median over rounds) and the
    loss curves (the last round's; every round starts from the same seed and batches)."""
    rates: dict[str, list[float]] = {d: [] for d in dtypes}
    losses: dict[str, list[float]] = {}
    for r in range(rounds):
        for d in dtypes:
            rate, losses[d] = simplegpt_run(cfg.replace(dtype=d), steps, log_every)
            rates[d].append(rate)
        print(f"round {r + 1}: " + ", ".join(f"{d} {rates[d][-1]:,.0f} tok/s" for d in dtypes), flush=True)
    base = dtypes[0]
    for d in dtypes:
        ratio = statistics.median(rates[d]) / statistics.median(rates[base])
        print(f"{d:>9}: {statistics.median(rates[d]):,.0f} tok/s ({ratio:.2f}x {base}); loss every {log_every} steps: "
              + " ".join(f"{x:.3f}" for x in losses[d]))
        if d != base:
            gap = max(abs(a - b) for a, b in zip(losses[d], losses[base]))
            print(f"{'':>9}  largest loss difference from {base}: {gap:.4f}")


def hf_round(cfg: TrainConfig, sampler: PackedSampler, vocab_size: int, steps: int, log_every: int) -> float:
    """The same model in transformers, trained the way its users write the loop."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                       n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, bos_token_id=vocab_size - 1,
                                       eos_token_id=vocab_size - 1))
    return hf_loop(model, cfg, sampler, steps, log_every)


def hf_loop(model: torch.nn.Module, cfg: TrainConfig, sampler: PackedSampler, steps: int, log_every: int) -> float:
    """A transformers causal LM trained the way its users write the loop (AdamW, clipping, the loss read
    every step); the median tokens/s over each log_every steps after the first."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay)
    rates, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        x, y = sampler.next_batch()
        ids = torch.cat([x, y[:, -1:]], dim=1)  # the block_size + 1 window; HF shifts the labels itself
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the loss is read every step, as the simplegpt loop does
        if step % log_every == 0:
            now = time.perf_counter()
            rates.append(log_every * cfg.batch_size * cfg.block_size / (now - t0))
            t0 = now
    return statistics.median(rates[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="training steps per round and per side")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (simplegpt, then HF)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_head", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=128)
    ap.add_argument("--block_size", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=12)
    ap.add_argument("--cpu-shards", type=int, default=0,
                    help="simplegpt's cpu_shards (0 = its default: one share of each batch per thread; 1 = split "
                         "every op over the threads instead, as PyTorch does)")
    ap.add_argument("--dtypes", help="comma-separated dtypes (float32,bfloat16): compare simplegpt's training in "
                                      "each, instead of against transformers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="simplegpt-bench-"))
    meta = prepare_corpus(args.corpus, work / "data", "char", progress=False)
    cfg = TrainConfig(data=str(work / "data"), n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                      block_size=args.block_size, batch_size=args.batch_size, lr=1e-3, warmup_iters=10,
                      eval_interval=10**9, sample_tokens=0, out_dir=str(work / "run"), num_threads=args.threads,
                      plot=False, tensorboard=False, device="cpu", cpu_shards=args.cpu_shards)
    cfg = cfg.replace(peak_flops=peak_flops(cfg, torch.device("cpu")))
    sampler = PackedSampler(TokenShards(work / "data", "train"), cfg.block_size, cfg.batch_size, seed=0)
    log_every = max(5, args.steps // 10)
    if args.dtypes:
        print(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, block {cfg.block_size}, "
              f"batch {cfg.batch_size}; {args.threads} threads; {args.steps} steps a run")
        compare_dtypes(cfg, args.dtypes.split(","), args.rounds, args.steps, log_every)
        return
    ours, theirs = [], []
    for r in range(args.rounds):
        ours.append(simplegpt_round(cfg, args.steps, log_every))
        theirs.append(hf_round(cfg, sampler, meta["vocab_size"], args.steps, log_every))
        print(f"round {r + 1}: simplegpt {ours[-1]:,.0f} tok/s, transformers {theirs[-1]:,.0f} tok/s", flush=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    from simplegpt.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], n_positions=cfg.block_size, n_embd=cfg.n_embd,
                          n_layer=cfg.n_layer, n_head=cfg.n_head))
    mfu = model.estimate_mfu(a, cfg.peak_flops, cfg.block_size)
    print(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, block {cfg.block_size}, "
          f"batch {cfg.batch_size}, vocab {meta['vocab_size']}; {args.threads} threads; simplegpt splits each "
          f"batch {core_shards(cfg, torch.device('cpu'), torch.float32, args.threads)} way(s)")
    print(f"simplegpt train:         {a:,.0f} tok/s  (MFU {mfu:.1%} of a measured {cfg.peak_flops / 1e9:.0f} "
          f"GFLOP/s fp32 matmul)")
    print(f"transformers + AdamW:    {b:,.0f} tok/s")
    print(f"ratio simplegpt / HF:    {a / b:.2f}x  (goal >= 1.6x)")


if __name__ == "__main__":
    main()
