"""Training speed and MFU: simplegpt's trainer against a transformers GPT2LMHeadModel loop, in one run.

    python bench/mfu.py                                  # GPT-2 124M, batch 16 x 1024, on the GPU if there is one
    python bench/mfu.py --compile                        # simplegpt's model through torch.compile
    python bench/mfu.py --device cpu --model tiny --batch 2 --block 64 --steps 3   # a check that it runs

Both sides train the same GPT-2 shape (--model: a simplegpt preset, gpt2 = 124M) from random weights
on the same batches (--batch x --block tokens from the prepared --data, by default the embedded
Shakespeare plays in GPT-2's tokenizer), one optimizer step per batch, for --steps steps each.

- simplegpt: its own trainer, `simplegpt.trainer.train`, as `simplegpt train` runs it: the device's
  backends set up (simplegpt.training.hardware.configure_backends: TF32, SDPA's flash kernel),
  --dtype autocast (auto: bf16 on GPUs that have it), PyTorch's fused AdamW (on a CPU the native
  step and kernels), gradient clipping, the LR schedule, and torch.compile with --compile. Its
  tokens/s are those the trainer writes to metrics.jsonl.
- transformers: GPT2LMHeadModel (its default attention implementation) trained the way its users
  write the loop: torch.optim.AdamW, autocast in the same dtype (with a GradScaler for float16),
  the model's own loss from labels=input_ids, clip_grad_norm_, the loss read every step as the
  trainer does. It runs first, before configure_backends changes anything process-wide (under bf16
  autocast TF32 touches no matmul of either model).

tokens/s is the median over windows of --steps/10 steps, the first window (warm-up, compilation)
left out, with the GPU synchronized at every window's end. MFU is the model FLOPs per token
(6N + 12·L·C·T, N the parameters without the position table: PaLM's appendix B, as nanoGPT's
estimate_mfu; GPT.flops_per_token) x tokens/s over the device's peak FLOP/s
(simplegpt.training.hardware.device_peak_flops: the dense bf16 peak of a known GPU, --peak-flops
to set it, the float32 peak of the cores used on a CPU); "unknown" for a GPU not in the table.
Goals (issue 17): simplegpt >= 50% MFU in bf16 for 124M on one H100/H200, and >= 1.5x transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simplegpt.config import TrainConfig  # noqa: E402
from simplegpt.data.prepare import prepare_corpus  # noqa: E402
from simplegpt.data.samplers import PackedSampler  # noqa: E402
from simplegpt.data.shards import TokenShards, read_meta  # noqa: E402
from simplegpt.devices import resolve_device  # noqa: E402
from simplegpt.model import GPT, PRESETS, preset_config  # noqa: E402
from simplegpt.trainer import train  # noqa: E402
from simplegpt.training.hardware import (configure_backends, device_peak_flops, format_mfu, mfu,  # noqa: E402
                                         resolve_dtype)


def windows(steps: int) -> int:
    """Steps per timing window: ten windows per run, at least one step each."""
    return max(1, steps // 10)


def median_after_warmup(rates: list[float]) -> float:
    """The median of the window rates without the first (warm-up, compilation); the one rate there is if only one."""
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def simplegpt_rate(cfg: TrainConfig) -> float:
    """Tokens/s of simplegpt's own trainer on cfg, from the metrics.jsonl it writes."""
    train(cfg, overwrite=True, progress=False, log=lambda s: None)
    records = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    return median_after_warmup([r["tok_per_s"] for r in records if r["kind"] == "train"])


def transformers_rate(cfg: TrainConfig, data: Path, vocab_size: int, device: torch.device,
                      dtype: torch.dtype) -> float:
    """Tokens/s of transformers' GPT2LMHeadModel of cfg's shape, trained the way its users write the loop."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                       n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, bos_token_id=vocab_size - 1,
                                       eos_token_id=vocab_size - 1)).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    sampler = PackedSampler(TokenShards(data, "train"), cfg.block_size, cfg.batch_size, cfg.seed)
    every = windows(cfg.max_iters)
    rates, t0 = [], time.perf_counter()
    for step in range(1, cfg.max_iters + 1):
        x, _ = sampler.next_batch()
        x = x.to(device, non_blocking=True)
        with autocast:
            loss = model(input_ids=x, labels=x).loss  # the model shifts the labels itself
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the loss read every step, as simplegpt's trainer reads it
        if step % every == 0:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            rates.append(every * cfg.batch_size * cfg.block_size / (now - t0))
            t0 = now
    return median_after_warmup(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--model", default="gpt2", choices=sorted(PRESETS),
                    help="the model's shape, a simplegpt preset (gpt2 = GPT-2 124M; tiny for a quick check)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per optimizer step")
    ap.add_argument("--block", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps for each side")
    ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                    help="autocast dtype for both sides; auto = bfloat16 on GPUs that have it, float32 on a CPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile simplegpt's model (its trainer's compile)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for both sides (0 = torch's default)")
    ap.add_argument("--data", default="", help="a prepared dataset folder (simplegpt prepare); default: the "
                                               "embedded Shakespeare plays in GPT-2's tokenizer, prepared here")
    ap.add_argument("--peak-flops", type=float, default=0.0,
                    help="the device's peak FLOP/s for MFU (0 = simplegpt's table / the CPU's measured peak)")
    args = ap.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="simplegpt-mfu-"))
    try:
        data = Path(args.data) if args.data else work / "data"
        meta = read_meta(data) if args.data else prepare_corpus("shakespeare", data, "gpt2", progress=False,
                                                               workers=1)
        shape = preset_config(args.model, n_positions=args.block, dropout=0.0)
        cfg = TrainConfig(model=shape, data=str(data), batch_size=args.batch, grad_accum_steps=1,
                          max_iters=args.steps, log_interval=windows(args.steps), eval_interval=args.steps,
                          eval_iters=1, sample_tokens=0, warmup_iters=max(1, args.steps // 10), lr=6e-4,
                          beta2=0.95, weight_decay=0.1, dtype=args.dtype, compile=args.compile,
                          device=str(device), num_threads=threads, plot=False, tensorboard=False,
                          out_dir=str(work / "run"), peak_flops=args.peak_flops)
        with torch.device("meta"):
            flops_per_token = GPT(dataclasses.replace(shape, vocab_size=meta["vocab_size"])).flops_per_token(args.block)
        peak, basis = device_peak_flops(cfg, device, threads)
        name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{device.type}, {threads} thread{'s' if threads != 1 else ''}")
        print(f"device: {name}; {str(dtype).removeprefix('torch.')}; model {args.model} ({cfg.n_layer} layers, "
              f"{cfg.n_head} heads, {cfg.n_embd} wide), batch {args.batch} x {args.block} tokens, {args.steps} steps "
              f"per side; simplegpt compile: {'on' if args.compile else 'off'}", flush=True)
        print(f"MFU against {basis}; {flops_per_token / 1e9:.3f} GFLOPs per token (6N + 12·L·C·T)", flush=True)

        theirs = transformers_rate(cfg, data, meta["vocab_size"], device, dtype)
        print(f"transformers GPT2LMHeadModel + AdamW: {theirs:,.0f} tok/s  "
              f"MFU {format_mfu(mfu(flops_per_token, theirs, peak))}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        configure_backends(device)
        ours = simplegpt_rate(cfg)
        print(f"simplegpt train:                      {ours:,.0f} tok/s  "
              f"MFU {format_mfu(mfu(flops_per_token, ours, peak))}", flush=True)
        print(f"ratio simplegpt / transformers:       {ours / theirs:.2f}x  (goals on one H100/H200, bf16, 124M: "
              f">= 1.5x and MFU >= 50%)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
