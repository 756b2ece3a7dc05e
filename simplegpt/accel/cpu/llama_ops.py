"""Autograd functions over the CPU kernels of Llama-style blocks: RMSNorm (csrc/rmsnorm.c), rotary
positions (csrc/rope.c), SwiGLU and ReLU^2 (csrc/activation.c) and causal grouped-query attention
(csrc/attention.c), forward and backward, for fp32 tensors on the CPU.

The training twin (modules.py) takes two fused nodes straight from the linear layers' outputs:
swiglu_fused from c_fc's gate|up product, and qkv_attention (QK-norm, rotation and attention) from
c_attn's q|k|v product. Each returns one gradient tensor for that product, written in place by the
kernels through strides, where splitting the product first would make autograd join the halves'
gradients with a copy (aten::cat) in every layer's backward.

Each function computes what its docstring's PyTorch expression computes, for inputs that `usable()`
accepts (attention: `attention_usable()`); callers check first and keep PyTorch's ops otherwise.
They run with or without autograd (a decode step's RMSNorm, RoPE and activations too); the decode
step's attention over a KV cache is `decode.attention_step`. Backward passes that produce
accumulated sums (RMSNorm's gain, attention's shared keys and values) sum in a fixed order, so
results are the same bits on any thread count.
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch.autograd.function import once_differentiable

from .lib import load
from .training import elementwise_function

MAX_ATTENTION_T = 256  # as training.MAX_ATTENTION_T: the kernel keeps each head's (T, T) probabilities


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels may take these tensors: fp32 on the CPU, the library loaded, not under
    autocast, and not inside torch.compile (which fuses these ops its own way)."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu") and load() is not None)


def head_size_ok(D: int) -> bool:
    """Whether the attention kernel takes heads of D floats: 8, 16 or a multiple of 32."""
    return D in (8, 16) or (D > 0 and D % 32 == 0)


def _strides(t: torch.Tensor) -> list[int]:
    return [t.stride(0), t.stride(1), t.stride(2)]


def _last_dense(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dimension is contiguous (the kernels take the other strides), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        x = x.contiguous()
        C = x.size(-1)
        R = x.numel() // C
        y, rstd = torch.empty_like(x), torch.empty(R)
        load().sg_rmsnorm_fwd(x.data_ptr(), None if weight is None else weight.data_ptr(), y.data_ptr(),
                              rstd.data_ptr(), R, C, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        C = x.size(-1)
        dx = torch.empty_like(x)
        dw = torch.empty_like(weight) if weight is not None and ctx.needs_input_grad[1] else None
        if not load().sg_rmsnorm_bwd(x.data_ptr(), None if weight is None else weight.data_ptr(), rstd.data_ptr(),
                                     dy.data_ptr(), dx.data_ptr(), None if dw is None else dw.data_ptr(),
                                     x.numel() // C, C):
            raise MemoryError("RMSNorm backward: no memory for the kernel's partial sums")
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (C,), weight, eps): x (..., C) / sqrt(mean(x^2) + eps) * weight (C,), or without
    a gain when weight is None. Also QK-norm: x (B, H, T, D) normalized over each head's D floats.
    Returns a contiguous tensor of x's shape."""
    return _RMSNorm.apply(x, None if weight is None else weight.contiguous(), eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The cosines and sines of rotary position embedding at integer `positions` (any shape, e.g. (T,)
    or (B, T) position ids): angle_i = position / theta^(2 i / head_dim) for i < head_dim / 2, as
    Hugging Face's Llama computes them in fp32. Returns (cos, sin), each positions.shape + (head_dim / 2,)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = _last_dense(x)
        B, H, T, D = x.shape
        y = torch.empty(B, H, T, D)
        cs_b = 0 if cos.dim() == 2 else T * (D // 2)
        load().sg_rope_fwd(x.data_ptr(), (ctypes.c_long * 3)(*_strides(x)), cos.data_ptr(), sin.data_ptr(), cs_b,
                           y.data_ptr(), B, H, T, D, 0)
        ctx.save_for_backward(cos, sin)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        dy = _last_dense(dy)
        B, H, T, D = dy.shape
        dx = torch.empty(B, H, T, D)
        load().sg_rope_fwd(dy.data_ptr(), (ctypes.c_long * 3)(*_strides(dy)), cos.data_ptr(), sin.data_ptr(),
                           0 if cos.dim() == 2 else T * (D // 2), dx.data_ptr(), B, H, T, D, 1)
        return dx, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, rotate-half convention (Hugging Face Llama's apply_rotary_pos_emb):
    x * cos + rotate_half(x) * sin, with x (B, H, T, D) (any strides; a view of a projection needs no
    copy) and cos, sin (T, D / 2) or (1, T, D / 2) shared by every row or (B, T, D / 2) per row
    (rope_cos_sin), or
    Hugging Face's (T, D) or (B, T, D) tables, whose two halves are equal (the first is used).
    Returns a contiguous (B, H, T, D) tensor; no gradient flows to cos and sin."""
    B, H, T, D = x.shape
    if D % 2 or cos.shape != sin.shape or cos.dim() not in (2, 3) or cos.shape[-2] != T \
            or cos.size(-1) not in (D // 2, D) or (cos.dim() == 3 and cos.size(0) not in (1, B)):
        raise ValueError(f"rope: x {tuple(x.shape)} takes cos and sin of (T, D/2) or (B, T, D/2) (D/2 or D last), "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dim() == 3 and cos.size(0) == 1:
        cos, sin = cos[0], sin[0]  # one table for every row
    cos, sin = (t[..., :D // 2].float().contiguous() for t in (cos, sin))
    return _Rope.apply(x, cos, sin)


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t (..., F) with its last dimension contiguous and its other dimensions one row stride apart
    (a contiguous tensor, or a half of a fused (..., 2F) one): t and that stride; else a copy."""
    t = _last_dense(t)
    R = t.numel() // t.size(-1)
    try:
        view = t.view(R, t.size(-1)) if t.dim() != 2 else t
    except RuntimeError:
        t = t.contiguous()
        return t, t.size(-1)
    return t, view.stride(0) if R > 1 else t.size(-1)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        (g, ldg), (u, ldu) = _rows(gate), _rows(up)
        F = g.size(-1)
        y = torch.empty(gate.shape)
        load().sg_swiglu_fwd(g.data_ptr(), u.data_ptr(), y.data_ptr(), y.numel() // F, F, ldg, ldu)
        ctx.save_for_backward(g, u)
        ctx.ld = ldg, ldu
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, u = ctx.saved_tensors
        dy = dy.contiguous()
        F = g.size(-1)
        dg, du = torch.empty(g.shape), torch.empty(g.shape)
        load().sg_swiglu_bwd(g.data_ptr(), u.data_ptr(), dy.data_ptr(), dg.data_ptr(), du.data_ptr(),
                             dy.numel() // F, F, *ctx.ld)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for gate and up (..., F) of one shape (the halves of a fused (..., 2F)
    product are taken without copies). Returns a contiguous (..., F) tensor."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    return _SwiGLU.apply(gate, up)


class _FusedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        h = h.contiguous()
        F = h.size(-1) // 2
        y = torch.empty(*h.shape[:-1], F)
        load().sg_swiglu_fwd(h.data_ptr(), h[..., F:].data_ptr(), y.data_ptr(), y.numel() // F, F, 2 * F, 2 * F)
        ctx.save_for_backward(h)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        dy = dy.contiguous()
        F = h.size(-1) // 2
        dh = torch.empty(h.shape)  # gate | up gradients side by side, as h: no join afterwards
        load().sg_swiglu_bwd_ld(h.data_ptr(), h[..., F:].data_ptr(), dy.data_ptr(), dh.data_ptr(),
                                dh[..., F:].data_ptr(), dy.numel() // F, F, 2 * F, 2 * F, 2 * F)
        return dh


def swiglu_fused(h: torch.Tensor) -> torch.Tensor:
    """swiglu(*h.chunk(2, -1)) = F.silu(h[..., :F]) * h[..., F:] for a fused gate|up product h
    (..., 2F), with one gradient tensor (..., 2F) for h: autograd joins no halves. Returns a
    contiguous (..., F) tensor; ValueError for an odd last dimension."""
    if h.size(-1) % 2:
        raise ValueError(f"swiglu_fused: h {tuple(h.shape)} must end in an even gate|up width")
    return _FusedSwiGLU.apply(h)


_ReLU2 = elementwise_function("relu2")


def relu2(x: torch.Tensor) -> torch.Tensor:
    """F.relu(x).square(), any shape (nanochat's MLP activation). Returns a contiguous tensor."""
    return _ReLU2.apply(x)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = _last_dense(q), _last_dense(k), _last_dense(v)
        B, H, T, D = q.shape
        G = H // k.size(1)
        scale = 1.0 / math.sqrt(D)
        out = torch.empty(B, T, H, D).transpose(1, 2)  # (B, H, T, D) over (B, T, H, D) memory
        lse = torch.empty(B, H, T)
        strides = (ctypes.c_long * 12)(*_strides(q), *_strides(k), *_strides(v), *_strides(out))
        if not load().sg_attn_gqa_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                      strides, B, T, H, G, D, scale):
            raise MemoryError("causal attention: no memory for the kernel's scratch buffers")
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.G, ctx.scale = G, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, out, lse = ctx.saved_tensors
        dout = _last_dense(dout)
        B, H, T, D = q.shape
        dq, dk, dv = (torch.empty(t.shape) for t in (q, k, v))
        strides = (ctypes.c_long * 24)(*(s for t in (q, k, v, out, dout, dq, dk, dv) for s in _strides(t)))
        if not load().sg_attn_gqa_bwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), dout.data_ptr(),
                                      lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), strides, B, T, H,
                                      ctx.G, D, ctx.scale):
            raise MemoryError("causal attention backward: no memory for the kernel's scratch buffers")
        return dq, dk, dv


def attention_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether causal_attention may take q (B, H, T, D), k and v (B, Hkv, T, D): usable(), 2..MAX_ATTENTION_T
    positions, a head size head_size_ok() takes, and H a multiple of Hkv."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        return False
    B, H, T, D = q.shape
    return (k.size(0) == B and k.size(2) == T and k.size(3) == D and H % k.size(1) == 0 and 1 < T <= MAX_ATTENTION_T
            and head_size_ok(D) and usable(q, k, v))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) for attention_usable()
    inputs: q (B, H, T, D), k and v (B, Hkv, T, D), query head h attending with key/value head
    h // (H // Hkv); scale 1 / sqrt(D), no dropout, any strides with the D floats contiguous.
    Returns (B, H, T, D) laid out as (B, T, H, D) in memory, so .transpose(1, 2).reshape(B, T, H * D)
    (the output projection's input) is a view."""
    return _CausalAttention.apply(q, k, v)


def _long3(t: torch.Tensor):
    return (ctypes.c_long * 3)(*_strides(t))


class _QKVAttention(torch.autograd.Function):
    """Causal GQA attention from a fused q|k|v product, QK-norm and rotary positions included: the
    backward writes the three heads' gradients into one (B, T, (H + 2K) D) tensor in place."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                q_w: torch.Tensor | None, k_w: torch.Tensor | None, eps: float | None, H: int, K: int) -> torch.Tensor:
        lib = load()
        qkv = qkv.contiguous()  # the linear layer's output already is
        B, T, W = qkv.shape
        D = W // (H + 2 * K)
        # (B, n, T, D) views of each part: token rows W floats apart, heads D apart
        q_in, k_in, v = (qkv[:, :, a * D:(a + n) * D].view(B, T, n, D).transpose(1, 2)
                         for a, n in ((0, H), (H, K), (H + K, K)))
        rstd = [None, None]
        outs = []
        for i, (x, n, w) in enumerate(((q_in, H, q_w), (k_in, K, k_w))):
            if eps is None and cos is None:
                outs.append(x)  # neither normed nor rotated: the attention reads the product itself
                continue
            y = torch.empty(B, T, n, D).transpose(1, 2)  # (B, n, T, D) over (B, T, n, D) memory
            src = x
            if eps is not None:  # QK-norm of each head's D floats, into y
                rstd[i] = torch.empty(B * T * n)
                lib.sg_rmsnorm_fwd_ld(x.data_ptr(), W, None if w is None else w.data_ptr(), y.data_ptr(), n * D,
                                      rstd[i].data_ptr(), B * T, n, D, eps)
                src = y
            if cos is not None:  # rotated in place when normed first
                lib.sg_rope(src.data_ptr(), _long3(src), cos.data_ptr(), sin.data_ptr(),
                            0 if cos.dim() == 2 else T * (D // 2), y.data_ptr(), _long3(y), B, n, T, D, 0)
            outs.append(y)
        q, k = outs
        scale = 1.0 / math.sqrt(D)
        out = torch.empty(B, T, H, D).transpose(1, 2)
        lse = torch.empty(B, H, T)
        strides = (ctypes.c_long * 12)(*_strides(q), *_strides(k), *_strides(v), *_strides(out))
        if not lib.sg_attn_gqa_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                   strides, B, T, H, H // K, D, scale):
            raise MemoryError("causal attention: no memory for the kernel's scratch buffers")
        ctx.save_for_backward(qkv, q, k, out, lse, cos, sin, q_w, k_w, *(r for r in rstd if r is not None))
        ctx.dims, ctx.eps, ctx.scale = (H, K, D), eps, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: torch.Tensor):
        lib = load()
        qkv, q, k, out, lse, cos, sin, q_w, k_w, *rstd = ctx.saved_tensors
        H, K, D = ctx.dims
        B, T, W = qkv.shape
        dout = _last_dense(dout)
        dqkv = torch.empty(B, T, W)
        parts = [dqkv[:, :, a * D:(a + n) * D].view(B, T, n, D).transpose(1, 2)
                 for a, n in ((0, H), (H, K), (H + K, K))]
        v = qkv[:, :, (H + K) * D:].view(B, T, K, D).transpose(1, 2)
        strides = (ctypes.c_long * 24)(*(s for t in (q, k, v, out, dout, *parts) for s in _strides(t)))
        if not lib.sg_attn_gqa_bwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), dout.data_ptr(),
                                   lse.data_ptr(), *(p.data_ptr() for p in parts), strides, B, T, H, H // K, D,
                                   ctx.scale):
            raise MemoryError("causal attention backward: no memory for the kernel's scratch buffers")
        dws = [None, None]
        for i, (d, n, w) in enumerate(((parts[0], H, q_w), (parts[1], K, k_w))):
            if cos is not None:  # the inverse rotation, in place
                lib.sg_rope(d.data_ptr(), _long3(d), cos.data_ptr(), sin.data_ptr(),
                            0 if cos.dim() == 2 else T * (D // 2), d.data_ptr(), _long3(d), B, n, T, D, 1)
            if ctx.eps is not None:  # through QK-norm, in place
                dw = torch.empty(D) if w is not None and ctx.needs_input_grad[3 + i] else None
                x = qkv[:, :, (0 if i == 0 else H * D):]
                if not lib.sg_rmsnorm_bwd_ld(x.data_ptr(), W, None if w is None else w.data_ptr(), rstd[i].data_ptr(),
                                             d.data_ptr(), W, d.data_ptr(), W, None if dw is None else dw.data_ptr(),
                                             B * T, n, D):
                    raise MemoryError("QK-norm backward: no memory for the kernel's partial sums")
                dws[i] = dw
        return dqkv, None, None, dws[0], dws[1], None, None, None


def qkv_attention_usable(qkv: torch.Tensor, n_head: int, n_kv_head: int) -> bool:
    """Whether qkv_attention may take qkv (B, T, (n_head + 2 n_kv_head) D): usable(), 2..MAX_ATTENTION_T
    positions, a head size head_size_ok() takes, and n_head a multiple of n_kv_head."""
    if qkv.dim() != 3 or n_kv_head < 1 or n_head % n_kv_head or qkv.size(2) % (n_head + 2 * n_kv_head):
        return False
    D = qkv.size(2) // (n_head + 2 * n_kv_head)
    return 1 < qkv.size(1) <= MAX_ATTENTION_T and head_size_ok(D) and usable(qkv)


def qkv_attention(qkv: torch.Tensor, n_head: int, n_kv_head: int, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                  qk_norm: tuple[torch.Tensor | None, torch.Tensor | None, float] | None = None) -> torch.Tensor:
    """Causal grouped-query attention of a fused projection qkv (B, T, (H + 2K) D), queries | keys |
    values with heads side by side (H = n_head, K = n_kv_head), for qkv_attention_usable() inputs:
    each head's queries and keys RMS-normed when qk_norm = (q gain (D) or None, k gain or None, eps)
    is given (F.rms_norm over D), then rotated when rope = (cos, sin) is given (the tables rope()
    takes, shared by every row or one per row), then causal_attention. One gradient tensor
    (B, T, (H + 2K) D) flows back to qkv (and to the QK-norm gains), with no joins or copies.
    Returns (B, H, T, D) laid out as (B, T, H, D) in memory (causal_attention's layout); ValueError
    for rotary tables of another shape, MemoryError where the kernels get no scratch memory."""
    B, T, W = qkv.shape
    D = W // (n_head + 2 * n_kv_head)
    cos = sin = None
    if rope is not None:
        cos, sin = rope
        if cos.shape != sin.shape or cos.dim() not in (2, 3) or cos.shape[-2] != T or cos.size(-1) not in (D // 2, D) \
                or (cos.dim() == 3 and cos.size(0) not in (1, B)):
            raise ValueError(f"qkv_attention: heads of {D} take cos and sin of (T, D/2) or (B, T, D/2) (D/2 or D "
                             f"last) for T = {T}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
        if cos.dim() == 3 and cos.size(0) == 1:
            cos, sin = cos[0], sin[0]
        cos, sin = (t[..., :D // 2].float().contiguous() for t in (cos, sin))
    q_w, k_w, eps = qk_norm if qk_norm is not None else (None, None, None)
    return _QKVAttention.apply(qkv, cos, sin, q_w, k_w, eps, n_head, n_kv_head)
