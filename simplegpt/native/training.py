"""Autograd functions over train.c for training on CPUs: LayerNorm, GPT-2's tanh-GELU and causal
self-attention.

At small-model sizes PyTorch's CPU kernels for these take ~35% of a training step (the GELU in
several passes with a slow tanh; attention as the flash kernel plus transposes and copies around
it). train.c does each in few passes each way, on torch's own OpenMP threads. model.py uses them when
`usable()` says so and the step needs gradients; everything else keeps PyTorch's kernels.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from . import load

MAX_ATTENTION_T = 256  # beyond this PyTorch's flash kernel is faster (at 256: 0.98-1.2x; docs/benchmarks.md)


def usable(x: torch.Tensor) -> bool:
    """Whether the training kernels may take x: fp32 on the CPU, with gradients, the library loaded,
    and not inside torch.compile (which fuses these ops its own way)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and load() is not None)


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        load().sg_gelu_fwd(x.data_ptr(), y.data_ptr(), x.numel())
        ctx.save_for_backward(x)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        load().sg_gelu_bwd(x.data_ptr(), dy.data_ptr(), dx.data_ptr(), x.numel())
        return dx


def gelu(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh") for usable() inputs, forward and backward in train.c."""
    return _Gelu.apply(x)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        x = x.contiguous()
        C = x.size(-1)
        R = x.numel() // C
        y = torch.empty_like(x)
        mean, rstd = torch.empty(R), torch.empty(R)
        load().sg_layernorm_fwd(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                                y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), R, C, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, None]:
        x, weight, mean, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        C = x.size(-1)
        R = x.numel() // C
        dx, dw = torch.empty_like(x), torch.empty_like(weight)
        db = torch.empty_like(weight) if ctx.has_bias else None
        if not load().sg_layernorm_bwd(x.data_ptr(), weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                                       dy.data_ptr(), dx.data_ptr(), dw.data_ptr(),
                                       None if db is None else db.data_ptr(), R, C):
            raise MemoryError("layer norm backward: no memory for the kernel's partial sums")
        return dx, dw, db, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.layer_norm over the last dimension for usable() inputs (fp32 weight and bias), in train.c."""
    return _LayerNorm.apply(x, weight, bias, eps)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, n_head: int) -> torch.Tensor:
        qkv = qkv.contiguous()
        B, T, C3 = qkv.shape
        C = C3 // 3
        scale = 1.0 / math.sqrt(C // n_head)
        out = torch.empty(B, T, C, dtype=qkv.dtype)
        lse = torch.empty(B, n_head, T, dtype=qkv.dtype)
        if not load().sg_attn_fwd(qkv.data_ptr(), out.data_ptr(), lse.data_ptr(), B, T, C, n_head, scale):
            raise MemoryError("causal attention: no memory for the kernel's scratch buffers")
        ctx.save_for_backward(qkv, out, lse)
        ctx.n_head, ctx.scale = n_head, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, None]:
        qkv, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        B, T, C3 = qkv.shape
        dqkv = torch.empty_like(qkv)
        if not load().sg_attn_bwd(qkv.data_ptr(), out.data_ptr(), dout.data_ptr(), lse.data_ptr(), dqkv.data_ptr(),
                                  B, T, C3 // 3, ctx.n_head, ctx.scale):
            raise MemoryError("causal attention backward: no memory for the kernel's scratch buffers")
        return dqkv, None


def attention_usable(qkv: torch.Tensor, n_head: int) -> bool:
    """Whether causal_attention may take this (B, T, 3C) buffer: usable(), a head size of 8, 16, 32
    or 64 and 2..MAX_ATTENTION_T positions."""
    return 1 < qkv.size(1) <= MAX_ATTENTION_T and qkv.size(-1) // 3 // n_head in (8, 16, 32, 64) and usable(qkv)


def causal_attention(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """Causal self-attention straight from c_attn's (B, T, 3C) output (q | k | v, heads side by side)
    to the (B, T, C) input of c_proj: softmax(q k^T / sqrt(D), causal) v per head, no dropout."""
    return _CausalAttention.apply(qkv, n_head)
