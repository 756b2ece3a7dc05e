"""Training throughput of a Llama-style model: simplegpt's trainer on a Llama-style block against the
same trainer on a GPT-2 block of the same parameter count, and against a Hugging Face
LlamaForCausalLM + AdamW loop of the Llama shape, in one run.

The shapes (default: 4 layers, 4 heads, 128 wide, block 64, batch 12, character vocabulary of
tinyshakespeare): GPT-2 as in bench/train_throughput.py; Llama-style with rotary positions, RMSNorm,
a SwiGLU MLP of Llama's default width (8/3 x 128 rounded up to 384), 2 key/value heads and no
biases, which gives the same parameters as the GPT-2 block to within its biases and position table
(both counts are printed). `--shape 124m` takes GPT-2 124M's blocks instead (12 layers, 12 heads,
768 wide; block 128, batch 4, the same character vocabulary), the Llama-style one with 6 key/value
heads and a SwiGLU of 2304 (3 x 768), which again gives GPT-2's block parameters exactly; its steps
take seconds, so its defaults are a few steps with short log windows. The three run in rounds
that alternate them, so that load from other processes hits them alike (the load average is
printed at the start and after each round); each figure is the median over rounds of a round's
median log window (the trainer's logged tokens/s; the reference loop's own windows), the first
window left out.

--interleave N instead alternates the two simplegpt models step by step in one process, N timed
steps each (bench/speedrun_step.py's Stepper: each run set up as train() sets it up), and prints
the median of each adjacent pair's ratio with its quartiles: load that drifts over seconds, which
a round of 124M steps lasts, then hits both alike. transformers is not run in this mode.

    .venv/bin/python bench/train_llama.py [--steps 60] [--rounds 3] [--threads 2]
    .venv/bin/python bench/train_llama.py --shape 124m [--steps 8] [--log-every 2] [--skip-hf]
    .venv/bin/python bench/train_llama.py --shape 124m --interleave 40
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from simplegpt.config import TrainConfig  # noqa: E402
from simplegpt.data.prepare import prepare_corpus  # noqa: E402
from simplegpt.data.samplers import PackedSampler  # noqa: E402
from simplegpt.data.shards import TokenShards  # noqa: E402
from simplegpt.model import GPT  # noqa: E402
from simplegpt.trainer import peak_flops  # noqa: E402
from speedrun_step import Stepper  # noqa: E402
from train_throughput import hf_loop, simplegpt_round  # noqa: E402

LLAMA = dict(positions="rotary", norm="rmsnorm", mlp="swiglu", bias=False, rms_norm_eps=1e-5)
# --shape: the defaults of the shape arguments (and of --steps and --log-every) for each shape
SHAPES = {
    "bench": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, intermediate_size=None, block_size=64,
                  batch_size=12, steps=60, log_every=None),
    "124m": dict(n_layer=12, n_head=12, n_kv_head=6, n_embd=768, intermediate_size=2304, block_size=128,
                 batch_size=4, steps=8, log_every=2),
}


def hf_llama_round(cfg: TrainConfig, sampler: PackedSampler, vocab_size: int, steps: int, log_every: int) -> float:
    """The Llama shape in transformers' LlamaForCausalLM, trained the way its users write the loop."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=m.n_embd, intermediate_size=m.ffn_size, num_hidden_layers=m.n_layer,
        num_attention_heads=m.n_head, num_key_value_heads=m.kv_heads, max_position_embeddings=m.n_positions,
        rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta, attention_bias=False, mlp_bias=False,
        tie_word_embeddings=True, attn_implementation="sdpa"))
    return hf_loop(model, cfg, sampler, steps, log_every)


def interleaved(configs: dict[str, TrainConfig], steps: int, warmup: int = 3) -> None:
    """The configs' runs stepped in turn, `steps` timed steps each after `warmup`: tokens/s of each
    (median) and the median and quartiles of the ratio of the last to the first, pair by pair."""
    names = list(configs)
    times: dict[str, list[float]] = {name: [] for name in names}
    steppers = {}
    try:
        for name, cfg in configs.items():
            steppers[name] = Stepper(cfg.replace(max_iters=10**9))
        for i in range(warmup + steps):
            for name in names:
                seconds = steppers[name].step()["step"]
                if i >= warmup:
                    times[name].append(seconds)
            if i >= warmup and (i - warmup + 1) % 10 == 0:
                print(f"{i - warmup + 1} steps each; load " + " ".join(f"{a:.1f}" for a in os.getloadavg()),
                      flush=True)
    finally:
        for stepper in steppers.values():
            stepper.close()
    tokens = {name: steppers[name].tokens for name in names}
    for name in names:
        print(f"{name:24s} {tokens[name] / statistics.median(times[name]):10,.0f} tok/s (median step "
              f"{statistics.median(times[name]) * 1e3:,.0f} ms)")
    first, last = names[0], names[-1]
    ratios = sorted((tokens[last] / b) / (tokens[first] / a) for a, b in zip(times[first], times[last]))
    q1, med, q3 = statistics.quantiles(ratios, n=4)
    print(f"ratio {last} / {first}, step by step: median {med:.3f}x (quartiles {q1:.3f}x-{q3:.3f}x, "
          f"range {ratios[0]:.3f}x-{ratios[-1]:.3f}x over {len(ratios)} pairs)  (goal >= 1.0x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bench",
                    help="the defaults of the shape arguments below (and of --steps, --log-every)")
    ap.add_argument("--steps", type=int, help="training steps per round and per model")
    ap.add_argument("--log-every", type=int, help="steps per log window (default max(5, steps / 10))")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (GPT-2, Llama-style, HF Llama)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--n_layer", type=int)
    ap.add_argument("--n_head", type=int)
    ap.add_argument("--n_kv_head", type=int)
    ap.add_argument("--n_embd", type=int)
    ap.add_argument("--intermediate_size", type=int, help="the Llama-style MLP's width (default: 8/3 n_embd rounded)")
    ap.add_argument("--block_size", type=int)
    ap.add_argument("--batch_size", type=int)
    ap.add_argument("--skip-hf", action="store_true", help="don't measure transformers' LlamaForCausalLM")
    ap.add_argument("--interleave", type=int, metavar="N",
                    help="alternate the two simplegpt models step by step, N timed steps each (no rounds, no HF)")
    args = ap.parse_args()
    for name, value in SHAPES[args.shape].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="simplegpt-bench-"))
    meta = prepare_corpus(args.corpus, work / "data", "char", progress=False)
    gpt2 = TrainConfig(data=str(work / "data"), n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                       block_size=args.block_size, batch_size=args.batch_size, lr=1e-3, warmup_iters=10,
                       eval_interval=10**9, sample_tokens=0, out_dir=str(work / "gpt2"), num_threads=args.threads,
                       plot=False, tensorboard=False, device="cpu")
    gpt2 = gpt2.replace(peak_flops=peak_flops(gpt2, torch.device("cpu")))
    llama = gpt2.replace(model=dataclasses.replace(gpt2.model, **LLAMA, n_kv_head=args.n_kv_head,
                                                   intermediate_size=args.intermediate_size),
                         out_dir=str(work / "llama"))
    sampler = PackedSampler(TokenShards(work / "data", "train"), args.block_size, args.batch_size, seed=0)
    log_every = args.log_every or max(5, args.steps // 10)
    n_gpt2, n_llama = (GPT(dataclasses.replace(c.model, vocab_size=meta["vocab_size"])).num_parameters()
                       for c in (gpt2, llama))
    print("load average at the start: " + " ".join(f"{a:.1f}" for a in os.getloadavg()), flush=True)
    if args.interleave:
        print(f"shape: {args.n_layer} layers, {args.n_head} heads, {args.n_embd} wide, block {args.block_size}, "
              f"batch {args.batch_size}; {args.threads} threads; parameters: GPT-2 {n_gpt2:,}, Llama-style "
              f"{n_llama:,}", flush=True)
        interleaved({"simplegpt GPT-2": gpt2, "simplegpt Llama-style": llama}, args.interleave)
        return
    rates: dict[str, list[float]] = {"simplegpt GPT-2": [], "simplegpt Llama-style": [], "transformers Llama": []}
    for r in range(args.rounds):
        rates["simplegpt GPT-2"].append(simplegpt_round(gpt2, args.steps, log_every))
        rates["simplegpt Llama-style"].append(simplegpt_round(llama, args.steps, log_every))
        if not args.skip_hf:
            rates["transformers Llama"].append(hf_llama_round(llama, sampler, meta["vocab_size"], args.steps,
                                                              log_every))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items() if v) + " tok/s; load "
              + " ".join(f"{a:.1f}" for a in os.getloadavg()), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items() if v}
    print(f"shape: {args.n_layer} layers, {args.n_head} heads, {args.n_embd} wide, block {args.block_size}, batch "
          f"{args.batch_size}, vocab {meta['vocab_size']}; {args.threads} threads, {args.steps} steps x "
          f"{args.rounds} rounds")
    print(f"parameters: GPT-2 {n_gpt2:,}, Llama-style {n_llama:,} ({args.n_kv_head} kv heads, MLP "
          f"{llama.model.ffn_size})")
    for k, v in med.items():
        print(f"{k:24s} {v:10,.0f} tok/s")
    a = med["simplegpt Llama-style"]
    print(f"ratio Llama-style / GPT-2 (simplegpt):  {a / med['simplegpt GPT-2']:.2f}x  (goal >= 1.0x)")
    if "transformers Llama" in med:
        print(f"ratio Llama-style / transformers Llama: {a / med['transformers Llama']:.2f}x  (goal >= 1.6x)")


if __name__ == "__main__":
    main()
