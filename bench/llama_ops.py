"""Times the CPU kernels of Llama-style blocks (simplegpt.accel.cpu.llama_ops, decode.attention_step)
against PyTorch's eager equivalents in the same run, and prints the ratios (PyTorch's time / ours).

Training ops are timed forward + backward on one block's activations; the decode step's attention
without autograd over a KV cache. Runs alternate between the two sides, medians of --repeats.

    python bench/llama_ops.py                          # the 4-layer bench model's block, batch 12 x 64
    python bench/llama_ops.py --batch 4 --seq 256 --embd 576 --heads 9 --kv-heads 3 --ffn 1536   # SmolLM2-135M's
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from simplegpt.accel.cpu import decode, lib, llama_ops


def rotate_half_rope(x, cos, sin):
    """Hugging Face Llama's apply_rotary_pos_emb in eager PyTorch (cos, sin: (T, D/2))."""
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def timed(fn, inputs, grad) -> float:
    leaves = [t.detach().requires_grad_(t.is_floating_point() and grad is not None) for t in inputs]
    start = time.perf_counter()
    y = fn(*leaves)
    if grad is not None:
        y.backward(grad)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=344, help="SwiGLU's intermediate size")
    p.add_argument("--cache", type=int, default=512, help="KV cache slots used by the decode step")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if lib.load() is None:
        raise SystemExit(f"the CPU kernels are not available: {lib.unavailable_reason()}")
    B, T, C, H, Hkv, Fw = a.batch, a.seq, a.embd, a.heads, a.kv_heads, a.ffn
    D = C // H
    torch.manual_seed(0)
    x, w = torch.randn(B, T, C), torch.randn(C)
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    cos, sin = llama_ops.rope_cos_sin(torch.arange(T), D, 10000.0)
    gate, up = torch.randn(B, T, Fw), torch.randn(B, T, Fw)
    kc, vc = torch.randn(B, Hkv, a.cache, D), torch.randn(B, Hkv, a.cache, D)
    q1 = torch.randn(B, H, D)
    ops = [  # name, ours, PyTorch's, inputs, gradient (None: no autograd)
        ("rms_norm (B, T, C)", lambda x, w: llama_ops.rms_norm(x, w, 1e-6), lambda x, w: F.rms_norm(x, (C,), w, 1e-6),
         [x, w], torch.randn(B, T, C)),
        ("qk-norm (B, H, T, D)", lambda q, w: llama_ops.rms_norm(q, w, 1e-6), lambda q, w: F.rms_norm(q, (D,), w, 1e-6),
         [q, w[:D].contiguous()], torch.randn(B, H, T, D)),
        ("rope q (B, H, T, D)", lambda q: llama_ops.rope(q, cos, sin), lambda q: rotate_half_rope(q, cos, sin), [q],
         torch.randn(B, H, T, D)),
        ("swiglu (B, T, F)", llama_ops.swiglu, lambda g, u: F.silu(g) * u, [gate, up], torch.randn(B, T, Fw)),
        ("relu2 (B, T, 4C)", llama_ops.relu2, lambda x: F.relu(x).square(), [torch.randn(B, T, 4 * C)],
         torch.randn(B, T, 4 * C)),
        (f"causal attention {H}/{Hkv} heads", llama_ops.causal_attention,
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), [q, k, v],
         torch.randn(B, H, T, D)),
        (f"decode step attention, {a.cache} slots", lambda q, k, v: decode.attention_step(q, k, v, a.cache),
         lambda q, k, v: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0],
         [q1, kc, vc], None),
    ]
    print(f"{lib.variant()} kernels, {torch.get_num_threads()} threads; B={B} T={T} C={C} heads {H}/{Hkv} "
          f"(D={D}) F={Fw}; medians of {a.repeats}, forward + backward except the decode step")
    print(f"{'op':36} {'ours ms':>9} {'PyTorch ms':>11} {'ratio':>7}")
    for name, ours, theirs, inputs, grad in ops:
        mine, ref = [], []
        for _ in range(a.repeats + 2):  # the first two are warm-up
            mine.append(timed(ours, inputs, grad))
            ref.append(timed(theirs, inputs, grad))
        m, r = statistics.median(mine[2:]), statistics.median(ref[2:])
        print(f"{name:36} {m * 1e3:9.3f} {r * 1e3:11.3f} {r / m:6.2f}x")


if __name__ == "__main__":
    main()
