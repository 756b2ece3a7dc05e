"""Autograd functions over train.c for training on CPUs: LayerNorm, GPT-2's tanh-GELU and causal
self-attention.

At small-model sizes PyTorch's CPU kernels for these take ~35% of a training step (the GELU in
several passes with a slow tanh; attention as the flash kernel plus transposes and copies around
it). train.c does each in few passes each way, on torch's own OpenMP threads. model.py uses them when
`usable()` says so and the step needs gradients; everything else keeps PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
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
                                       dy.data_ptr(), None, dx.data_ptr(), dw.data_ptr(),
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


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _Block(torch.autograd.Function):
    """A whole pre-LN GPT-2 block, x + attn(ln_1(x)) then + mlp(ln_2(.)), forward and backward by
    hand: MKL's matmuls through torch.mm and train.c's kernels, with the biases, the residual adds
    and the bias gradient of the MLP folded into the kernels' passes. One autograd node instead of
    ~20, and no separate passes for bias copies, residual adds and gradient sums."""

    @staticmethod
    def forward(ctx, x, ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, mp_w, mp_b,
                n_head: int, eps1: float, eps2: float):
        lib = load()
        B, T, C = x.shape
        M, F = B * T, fc_w.size(0)
        scale = 1.0 / math.sqrt(C // n_head)
        x = x.contiguous()
        ln1, mean1, rstd1 = torch.empty(M, C), torch.empty(M), torch.empty(M)
        lib.sg_layernorm_fwd(x.data_ptr(), ln1_w.data_ptr(), _ptr(ln1_b), ln1.data_ptr(), mean1.data_ptr(),
                             rstd1.data_ptr(), M, C, eps1)
        qkv = torch.mm(ln1, attn_w.t()) if attn_b is None else torch.addmm(attn_b, ln1, attn_w.t())
        att, lse = torch.empty(M, C), torch.empty(B, n_head, T)
        if not lib.sg_attn_fwd(qkv.data_ptr(), att.data_ptr(), lse.data_ptr(), B, T, C, n_head, scale):
            raise MemoryError("causal attention: no memory for the kernel's scratch buffers")
        h = torch.mm(att, proj_w.t())
        x2, ln2, mean2, rstd2 = torch.empty(M, C), torch.empty(M, C), torch.empty(M), torch.empty(M)
        xb = None if mp_b is None else torch.empty(M, C)  # x2 + the MLP's output bias: addmm's input below
        lib.sg_residual_layernorm_fwd(x.data_ptr(), h.data_ptr(), _ptr(proj_b), x2.data_ptr(), _ptr(mp_b), _ptr(xb),
                                      ln2_w.data_ptr(), _ptr(ln2_b), ln2.data_ptr(), mean2.data_ptr(),
                                      rstd2.data_ptr(), M, C, eps2)
        u = torch.mm(ln2, fc_w.t())
        g = torch.empty_like(u)
        lib.sg_bias_gelu_fwd(u.data_ptr(), _ptr(fc_b), g.data_ptr(), M, F)  # u gets its bias in place
        y = torch.addmm(x2 if xb is None else xb, g, mp_w.t())
        ctx.save_for_backward(x, ln1, mean1, rstd1, qkv, att, lse, x2, ln2, mean2, rstd2, u, g,
                              ln1_w, attn_w, proj_w, ln2_w, fc_w, mp_w)
        ctx.biases = (ln1_b is not None, attn_b is not None, proj_b is not None, ln2_b is not None,
                      fc_b is not None, mp_b is not None)
        ctx.n_head, ctx.scale = n_head, scale
        return y.view(B, T, C)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        lib = load()
        (x, ln1, mean1, rstd1, qkv, att, lse, x2, ln2, mean2, rstd2, u, g,
         ln1_w, attn_w, proj_w, ln2_w, fc_w, mp_w) = ctx.saved_tensors
        has_ln1_b, has_attn_b, has_proj_b, has_ln2_b, has_fc_b, has_mp_b = ctx.biases
        need = ctx.needs_input_grad
        B, T, C = x.shape
        M, F = B * T, fc_w.size(0)
        dy = dy.contiguous().view(M, C)
        # MLP: y = x2 + gelu(ln2 fc_w^T + fc_b) mp_w^T + mp_b
        d_mp_w = torch.mm(dy.t(), g) if need[11] else None
        d_mp_b = dy.sum(0) if has_mp_b and need[12] else None
        du = torch.mm(dy, mp_w)
        d_fc_b = torch.empty(F) if has_fc_b and need[10] else None
        if not lib.sg_gelu_bwd_db(u.data_ptr(), du.data_ptr(), du.data_ptr(), _ptr(d_fc_b), M, F):
            raise MemoryError("GELU backward: no memory for the bias gradient's partial sums")
        d_fc_w = torch.mm(du.t(), ln2) if need[9] else None
        d_ln2 = torch.mm(du, fc_w)
        # ln_2 and the residual: dx2 = dy + ln_2's backward
        dx2, d_ln2_w = torch.empty(M, C), torch.empty(C)
        d_ln2_b = torch.empty(C) if has_ln2_b else None
        if not lib.sg_layernorm_bwd(x2.data_ptr(), ln2_w.data_ptr(), mean2.data_ptr(), rstd2.data_ptr(),
                                    d_ln2.data_ptr(), dy.data_ptr(), dx2.data_ptr(), d_ln2_w.data_ptr(),
                                    _ptr(d_ln2_b), M, C):
            raise MemoryError("layer norm backward: no memory for the kernel's partial sums")
        # attention: x2 = x + attention(ln1 attn_w^T + attn_b) proj_w^T + proj_b
        d_proj_w = torch.mm(dx2.t(), att) if need[5] else None
        d_proj_b = dx2.sum(0) if has_proj_b and need[6] else None
        d_att = torch.mm(dx2, proj_w)
        dqkv = torch.empty(M, 3 * C)
        if not lib.sg_attn_bwd(qkv.data_ptr(), att.data_ptr(), d_att.data_ptr(), lse.data_ptr(), dqkv.data_ptr(),
                               B, T, C, ctx.n_head, ctx.scale):
            raise MemoryError("causal attention backward: no memory for the kernel's scratch buffers")
        d_attn_w = torch.mm(dqkv.t(), ln1) if need[3] else None
        d_attn_b = dqkv.sum(0) if has_attn_b and need[4] else None
        d_ln1 = torch.mm(dqkv, attn_w)
        dx, d_ln1_w = torch.empty(M, C), torch.empty(C)
        d_ln1_b = torch.empty(C) if has_ln1_b else None
        if not lib.sg_layernorm_bwd(x.data_ptr(), ln1_w.data_ptr(), mean1.data_ptr(), rstd1.data_ptr(),
                                    d_ln1.data_ptr(), dx2.data_ptr(), dx.data_ptr(), d_ln1_w.data_ptr(),
                                    _ptr(d_ln1_b), M, C):
            raise MemoryError("layer norm backward: no memory for the kernel's partial sums")
        return (dx.view(B, T, C), d_ln1_w, d_ln1_b, d_attn_w, d_attn_b, d_proj_w, d_proj_b, d_ln2_w, d_ln2_b,
                d_fc_w, d_fc_b, d_mp_w, d_mp_b, None, None, None)


def block_usable(x: torch.Tensor, block: torch.nn.Module) -> bool:
    """Whether block(x, block) may run this GPT-2 Block: usable(x), no dropout in training, a head
    size of 8, 16, 32 or 64, 2..MAX_ATTENTION_T positions, and fp32 contiguous CPU parameters
    with LayerNorm weights."""
    attn, mlp = block.attn, block.mlp
    if block.training and (attn.dropout or attn.resid_dropout.p or mlp.dropout.p):
        return False
    if x.dim() != 3 or not 1 < x.size(1) <= MAX_ATTENTION_T or attn.head_dim not in (8, 16, 32, 64):
        return False
    if block.ln_1.weight is None or block.ln_2.weight is None or not usable(x):
        return False
    return all(p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous() for p in block.parameters())


def block(x: torch.Tensor, block: torch.nn.Module) -> torch.Tensor:
    """A GPT-2 Block (model.Block: ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj) on
    x (B, T, C) with causal attention, as one autograd node (see _Block), for block_usable() inputs."""
    a, m = block.attn, block.mlp
    return _Block.apply(x, block.ln_1.weight, block.ln_1.bias, a.c_attn.weight, a.c_attn.bias, a.c_proj.weight,
                        a.c_proj.bias, block.ln_2.weight, block.ln_2.bias, m.c_fc.weight, m.c_fc.bias,
                        m.c_proj.weight, m.c_proj.bias, a.n_head, block.ln_1.eps, block.ln_2.eps)


class _AdamWPlan:
    """What adamw_step needs of an optimizer that does not change from step to step: its tensors
    with gradients, their state tensors and the C arrays of their addresses. Rebuilt whenever any of
    these is no longer the same tensor at the same address (a load_state_dict, a new parameter)."""

    def __init__(self, optimizer: torch.optim.AdamW, params: list[torch.Tensor]):
        self.params = params
        self.group_of = [next(i for i, g in enumerate(optimizer.param_groups) if any(p is q for q in g["params"]))
                         for p in params]
        for p in params:
            state = optimizer.state[p]
            if not state:  # as torch.optim.AdamW initialises it
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [optimizer.state[p] for p in params]
        self.steps = [st["step"] for st in states]
        self.moments = [(st["exp_avg"], st["exp_avg_sq"]) for st in states]
        self.ok = all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
                      for pair in self.moments for t in pair) and all(
                          isinstance(t, torch.Tensor) and t.numel() == 1 for t in self.steps)
        self.addresses = self._addresses(optimizer)
        self.p_ptrs = _pointers(params)
        self.m_ptrs = _pointers([m for m, _ in self.moments])
        self.v_ptrs = _pointers([v for _, v in self.moments])
        self.sizes = (ctypes.c_long * len(params))(*(p.numel() for p in params))

    def _addresses(self, optimizer: torch.optim.AdamW) -> list:
        states = [optimizer.state.get(p, {}) for p in self.params]
        return [(p.data_ptr(), st.get("exp_avg"), st.get("exp_avg_sq"), st.get("step"))
                for p, st in zip(self.params, states)]

    def current(self, optimizer: torch.optim.AdamW, params: list[torch.Tensor]) -> bool:
        if len(params) != len(self.params) or any(p is not q for p, q in zip(params, self.params)):
            return False
        now = self._addresses(optimizer)
        return all(a[0] == b[0] and a[1] is b[1] and a[2] is b[2] and a[3] is b[3]
                   for a, b in zip(now, self.addresses))


def _pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def _adamw_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor] | None:
    """The parameters with gradients, if adamw_step may take this optimizer: a torch.optim.AdamW
    without amsgrad/maximize/capturable/differentiable and with float lrs, whose parameters and
    gradients are dense contiguous fp32 CPU tensors; None otherwise."""
    if type(optimizer) is not torch.optim.AdamW or load() is None:
        return None
    out = []
    for group in optimizer.param_groups:
        if (group.get("amsgrad") or group.get("maximize") or group.get("capturable") or group.get("differentiable")
                or isinstance(group["lr"], torch.Tensor)):
            return None
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if not (p.device.type == "cpu" and p.dtype == torch.float32 and g.dtype == torch.float32
                    and p.is_contiguous() and g.layout == torch.strided and g.is_contiguous()):
                return None
            out.append(p)
    return out


def adamw_step(optimizer: torch.optim.Optimizer, max_norm: float, threads: int) -> float | None:
    """torch.nn.utils.clip_grad_norm_(params, max_norm) (when max_norm > 0) and then optimizer.step(),
    in two passes of train.c over all the tensors on `threads` threads: the gradients' norm, then
    the AdamW update with the clipping factor applied on the fly (the gradients are left as they
    are). PyTorch takes a pass per op and per tensor group, single-threaded inside a split step.

    The optimizer's state (step, exp_avg, exp_avg_sq) is PyTorch's own, so its state_dict, a
    checkpoint and a resume are unchanged. Returns the total gradient norm (NaN when max_norm <= 0),
    or None without doing anything when the optimizer or its tensors are not ones it takes
    (the caller then runs PyTorch's path)."""
    params = _adamw_params(optimizer)
    if params is None:
        return None
    if not params:
        return math.nan
    plan = getattr(optimizer, "_simplegpt_plan", None)
    if plan is None or not plan.current(optimizer, params):
        plan = _AdamWPlan(optimizer, params)
        optimizer._simplegpt_plan = plan
    if not plan.ok:
        return None
    lib = load()
    grads = _pointers([p.grad for p in params])
    norm, scale = math.nan, 1.0
    if max_norm > 0:
        sq = ctypes.c_double()
        if not lib.sg_sqnorm(grads, plan.sizes, len(params), threads, ctypes.byref(sq)):
            raise MemoryError("optimizer step: no memory for the gradient norm's partial sums")
        norm = math.sqrt(sq.value)
        scale = min(max_norm / (norm + 1e-6), 1.0)  # clip_grad_norm_'s factor
    torch._foreach_add_(plan.steps, 1.0)
    steps = torch.stack(plan.steps).tolist()
    per_group = [(g["lr"], g["weight_decay"], *g["betas"], g["eps"]) for g in optimizer.param_groups]
    hp = [x for i, step in zip(plan.group_of, steps) for x in (*per_group[i], step)]
    if not lib.sg_adamw(plan.p_ptrs, grads, plan.m_ptrs, plan.v_ptrs, plan.sizes, (ctypes.c_double * len(hp))(*hp),
                        len(params), scale, threads):
        raise MemoryError("optimizer step: no memory for the work list")
    return norm
