"""Autograd functions over the training kernels (csrc/) for training on CPUs: LayerNorm, GPT-2's tanh-GELU and causal
self-attention; a whole GPT-2 block; a whole model with its loss; and AdamW with clipping.

At small-model sizes PyTorch's CPU ops around the matrix products take about half of a training
step (the GELU in several passes with a slow tanh; attention as the flash kernel plus transposes
and copies; bias copies, residual adds, autograd and Python between ~20 ops a block). The kernels
do each in few passes, on torch's own OpenMP threads. model.py takes the biggest piece that applies:
GPT.loss -> model_loss (the whole step), else Block -> block, else the single ops, when the step
needs gradients in fp32 on a CPU; everything else keeps PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import math
import threading
from pathlib import Path

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ...model import IGNORE_INDEX  # csrc/model.c's IGNORE_INDEX is the same -100
from .lib import load
from .slots import BLOCK_SLOTS

HEAD_SIZES = (8, 16, 32, 64)  # the attention kernel's head sizes
_FC_W = BLOCK_SLOTS.index(("mlp.c_fc", "weight"))  # its rows are the MLP's width F
MAX_ATTENTION_T = 256  # beyond this PyTorch's flash kernel is faster (at 256: 0.98-1.2x; docs/benchmarks.md)


def usable(x: torch.Tensor) -> bool:
    """Whether the training kernels may take x: fp32 on the CPU, with gradients, the library loaded,
    not under autocast, and not inside torch.compile (which fuses these ops its own way)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu") and load() is not None)


def elementwise_function(op: str) -> type[torch.autograd.Function]:
    """The autograd Function of an elementwise op of any shape over its C kernels
    sg_{op}_fwd(x, y, n) and sg_{op}_bwd(x, dy, dx, n) (n floats; the backward reads the saved input)."""

    class Elementwise(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor) -> torch.Tensor:
            x = x.contiguous()
            y = torch.empty_like(x)
            getattr(load(), f"sg_{op}_fwd")(x.data_ptr(), y.data_ptr(), x.numel())
            ctx.save_for_backward(x)
            return y

        @staticmethod
        @once_differentiable
        def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            dy = dy.contiguous()
            dx = torch.empty_like(x)
            getattr(load(), f"sg_{op}_bwd")(x.data_ptr(), dy.data_ptr(), dx.data_ptr(), x.numel())
            return dx

    Elementwise.__name__ = Elementwise.__qualname__ = f"_{op.capitalize()}"
    return Elementwise


_Gelu = elementwise_function("gelu")


def gelu(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh") for usable() inputs, forward and backward in csrc/gelu.c."""
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
    """F.layer_norm over the last dimension for usable() inputs (fp32 weight and bias), in csrc/layernorm.c."""
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
    return 1 < qkv.size(1) <= MAX_ATTENTION_T and qkv.size(-1) // 3 // n_head in HEAD_SIZES and usable(qkv)


def causal_attention(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """Causal self-attention straight from c_attn's (B, T, 3C) output (q | k | v, heads side by side)
    to the (B, T, C) input of c_proj: softmax(q k^T / sqrt(D), causal) v per head, no dropout."""
    return _CausalAttention.apply(qkv, n_head)


class _Block(torch.autograd.Function):
    """A whole pre-LN GPT-2 block, x + attn(ln_1(x)) then + mlp(ln_2(.)), forward and backward in
    one call each of csrc/block.c (sg_block_fwd/bwd): its kernels, with the biases, the residual adds and
    the bias gradients folded into their passes, and the matrix products in the BLAS torch uses.
    One autograd node instead of ~20, and the GIL released for the whole block, so the threads of
    a split step (training/core_shards.py) do not queue for it between ops."""

    @staticmethod
    def forward(ctx, x, *args):
        *params, n_head, eps1, eps2 = args
        lib = load()
        B, T, C = x.shape
        F = params[_FC_W].size(0)
        x = x.contiguous()
        saved = torch.empty(lib.sg_block_saved_floats(B, T, C, F, n_head))
        y = torch.empty(B, T, C)
        if not lib.sg_block_fwd(x.data_ptr(), _pointers(params), y.data_ptr(), saved.data_ptr(), B, T, C, F, n_head,
                                eps1, eps2):
            raise MemoryError("causal attention: no memory for the kernel's scratch buffers")
        ctx.save_for_backward(x, saved, *params)
        ctx.n_head = n_head
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, saved, *params = ctx.saved_tensors
        B, T, C = x.shape
        dy = dy.contiguous()
        grads = [torch.empty_like(p) if p is not None and need else None
                 for p, need in zip(params, ctx.needs_input_grad[1:])]
        dx = torch.empty_like(x)
        if not load().sg_block_bwd(x.data_ptr(), _pointers(params), saved.data_ptr(), dy.data_ptr(), dx.data_ptr(),
                                   _pointers(grads), B, T, C, params[_FC_W].size(0), ctx.n_head):
            raise MemoryError("block backward: no memory for the kernels' work buffers")
        return (dx, *grads, None, None, None)


_sgemm: int | None = None  # the address of torch's sgemm_, 0 where it has none; None before the first look


_sgemm_lock = threading.Lock()


def _blas_ready() -> bool:
    """Whether the kernels have torch's sgemm (MKL's Fortran entry point in libtorch_cpu, as the Linux
    x86-64 wheels have it); found once. The C side is given the address before `_sgemm` says it is
    there: core shards' threads call this at once, and one must not run a kernel before that."""
    global _sgemm
    if _sgemm is None:
        with _sgemm_lock:
            if _sgemm is None:
                try:
                    fn = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).sgemm_
                except (OSError, AttributeError):
                    address = 0
                else:
                    address = ctypes.cast(fn, ctypes.c_void_p).value or 0
                    load().sg_set_sgemm(address)
                _sgemm = address
    return bool(_sgemm)


def _block_ok(block: torch.nn.Module, T: int) -> bool:
    """A Block the fused kernels take at T positions: no dropout in training, a head size of 8, 16,
    32 or 64, 2..MAX_ATTENTION_T positions, LayerNorm weights, fp32 contiguous CPU parameters."""
    attn, mlp = block.attn, block.mlp
    if block.training and (attn.dropout or attn.resid_dropout.p or mlp.dropout.p):
        return False
    if not 1 < T <= MAX_ATTENTION_T or attn.head_dim not in HEAD_SIZES:
        return False
    if block.ln_1.weight is None or block.ln_2.weight is None:
        return False
    return all(_fp32_cpu_dense(p) for p in block.parameters())


def block_usable(x: torch.Tensor, block: torch.nn.Module) -> bool:
    """Whether block(x, block) may run this GPT-2 Block: usable(x), torch's sgemm found, and
    _block_ok at x's length."""
    return x.dim() == 3 and usable(x) and _blas_ready() and _block_ok(block, x.size(1))




def block(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """A GPT-2 Block (model.Block: ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj) on
    x (B, T, C) with causal attention, as one autograd node (see _Block), for block_usable() inputs."""
    params = [getattr(module.get_submodule(mod), name) for mod, name in BLOCK_SLOTS]
    return _Block.apply(x, *params, module.attn.n_head, module.ln_1.eps, module.ln_2.eps)


class _ModelLoss(torch.autograd.Function):
    """GPT.forward's mean cross-entropy loss for a training step, the whole model in one call of
    csrc/model.c each way (sg_gpt_fwd/bwd: embeddings, the blocks as in _Block, ln_f, the tied head and
    the loss). No logits leave it, and nothing runs in Python or autograd between the layers."""

    @staticmethod
    def forward(ctx, idx, targets, shape, *params):
        B, T, C, V, L, F, H, eps, _ = shape
        lib = load()
        bufs = ([torch.empty((L + 1) * B * T * C)] + [torch.empty(lib.sg_block_saved_floats(B, T, C, F, H))
                                                       for _ in range(L)] + [torch.empty(lib.sg_gpt_head_floats(B, T, C, V))])
        loss, count = ctypes.c_double(), ctypes.c_long()
        rc = lib.sg_gpt_fwd(idx.data_ptr(), targets.data_ptr(), B, T, C, V, L, F, H, eps, _pointers(params),
                            _pointers(bufs), ctypes.byref(loss), ctypes.byref(count))
        if rc < 0:
            raise ValueError(f"target token ids must be in 0..{V - 1} or {IGNORE_INDEX} (no loss)")
        if rc == 0:
            raise MemoryError("causal attention: no memory for the kernel's scratch buffers")
        ctx.save_for_backward(idx, targets, *bufs, *params)
        ctx.shape, ctx.count = shape, count.value
        return torch.tensor(loss.value, dtype=torch.float32)

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss: torch.Tensor):
        B, T, C, V, L, F, H, _, n_positions = ctx.shape
        idx, targets, *rest = ctx.saved_tensors
        bufs, params = rest[:L + 2], rest[L + 2:]
        grads = [torch.empty_like(p) if need else None for p, need in zip(params, ctx.needs_input_grad[3:])]
        scale = float(dloss) / ctx.count if ctx.count else 0.0
        if not load().sg_gpt_bwd(idx.data_ptr(), targets.data_ptr(), B, T, C, V, L, F, H, scale, _pointers(params),
                                 _pointers(bufs), _pointers(grads), n_positions):
            raise MemoryError("model backward: no memory for the kernels' work buffers")
        return (None, None, None, *grads)


class WholeModelPlan:
    """What the whole-model passes (_ModelPlan here, llama_model's plan) find once of a model and
    check each step: static_ok (the checks that cannot change without a new plan), the dropout
    modules and attention layers, and the parameters in the C pass's order (None where absent)."""

    static_ok: bool
    dropouts: list
    attn: list
    params: list

    def usable_now(self, training: bool) -> bool:
        if not self.static_ok:
            return False
        if training and (any(d.p for d in self.dropouts) or any(a.dropout for a in self.attn)):
            return False
        return all(p is None or _fp32_cpu_dense(p) for p in self.params)


class _ModelPlan(WholeModelPlan):
    """What model_usable and model_loss need of a GPT, found once: its parameters in csrc/model.c's
    order with the module and name each sits at, and the checks that cannot change without a new
    plan. Walking the module tree each step took ~0.4 ms, in both threads of a split step."""

    def __init__(self, model: torch.nn.Module):
        tr = model.transformer
        self.h, self.head = tr.h, model.lm_head
        self.slots = [(tr.wte, "weight"), (tr.wpe, "weight")]
        for b in tr.h:
            self.slots += [(b.get_submodule(mod), name) for mod, name in BLOCK_SLOTS]
        self.slots += [(tr.ln_f, "weight"), (tr.ln_f, "bias")]
        self.params = [mod._parameters.get(name) for mod, name in self.slots]
        self.dropouts = [tr.drop] + [d for b in tr.h for d in (b.attn.resid_dropout, b.mlp.dropout)]
        self.attn = [b.attn for b in tr.h]
        eps = tr.ln_f.eps
        self.eps, self.F = eps, tr.h[0].mlp.c_fc.weight.size(0)
        self.static_ok = (self.head.weight is tr.wte.weight and self.head.bias is None
                          and all(b.ln_1.eps == eps and b.ln_2.eps == eps and b.attn.head_dim in HEAD_SIZES
                                  and b.mlp.c_fc.weight.size(0) == self.F for b in tr.h)
                          and all(self.params[i] is not None for i in range(0, len(self.params), 2)))

    def current(self, model: torch.nn.Module) -> bool:
        return (model.transformer.h is self.h and model.lm_head is self.head and self.head.weight is self.params[0]
                and all(mod._parameters.get(name) is p for (mod, name), p in zip(self.slots, self.params)))



def _model_plan(model: torch.nn.Module) -> _ModelPlan:
    plan = model.__dict__.get("_simplegpt_plan")
    if plan is None or not plan.current(model):
        plan = _ModelPlan(model)
        model.__dict__["_simplegpt_plan"] = plan
    return plan


def step_ok(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> bool:
    """What a whole-model pass (model_loss, llama_model.loss) needs of a step whatever the model:
    gradients on, no autocast or compile, the library and torch's sgemm found, and idx and targets
    (B, T) with 2..min(n_positions, MAX_ATTENTION_T) positions."""
    if not (torch.is_grad_enabled() and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and load() is not None and _blas_ready()):
        return False
    return idx.dim() == 2 and targets.shape == idx.shape and 1 < idx.size(1) <= min(model.config.n_positions,
                                                                                     MAX_ATTENTION_T)


def model_usable(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> bool:
    """Whether model_loss may take this step: step_ok, the head tied to the token embedding without a
    bias, no dropout in training, one LayerNorm epsilon, head sizes of 8, 16, 32 or 64, and fp32
    contiguous CPU parameters."""
    return step_ok(model, idx, targets) and _model_plan(model).usable_now(model.training)


def model_loss(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """model(idx, targets)[1] (a model.GPT) for model_usable() steps, as one autograd node."""
    plan = _model_plan(model)
    cfg = model.config
    B, T = idx.shape
    shape = (B, T, cfg.n_embd, cfg.vocab_size, cfg.n_layer, plan.F, cfg.n_head, plan.eps,
             plan.params[1].size(0))
    return _ModelLoss.apply(idx.long().contiguous(), targets.long().contiguous(), shape, *plan.params)


class _AdamWPlan:
    """What adamw_step needs of an optimizer that does not change from step to step: its tensors
    with gradients, their state tensors and the C arrays of their addresses. Rebuilt whenever a
    parameter, its state or its storage is no longer the same (a load_state_dict, a new parameter)."""

    def __init__(self, optimizer: torch.optim.AdamW, params: list[torch.Tensor]):
        self.params = params
        self.group_of = np.array([next(i for i, g in enumerate(optimizer.param_groups)
                                        if any(p is q for q in g["params"])) for p in params])
        for p in params:
            state = optimizer.state[p]
            if not state:  # as torch.optim.AdamW initialises it
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self.states = [optimizer.state[p] for p in params]  # load_state_dict makes new ones
        self.moments = [(st["exp_avg"], st["exp_avg_sq"]) for st in self.states]
        self.ok = (all(_fp32_cpu_dense(t) for t in params) and all(_fp32_cpu_dense(t) for mv in self.moments for t in mv)
                   and all(isinstance(st["step"], torch.Tensor) and st["step"].numel() == 1 for st in self.states))
        if self.ok:
            # every parameter's step count becomes a view into one buffer: one add a step, not one per tensor
            self.steps = torch.tensor([float(st["step"]) for st in self.states], dtype=torch.float32)
            for i, st in enumerate(self.states):
                st["step"] = self.steps[i]
        self.data = [p.data_ptr() for p in params]
        self.p_ptrs = _pointers(params)
        self.m_ptrs = _pointers([m for m, _ in self.moments])
        self.v_ptrs = _pointers([v for _, v in self.moments])
        self.sizes = (ctypes.c_long * len(params))(*(p.numel() for p in params))

    def current(self, optimizer: torch.optim.AdamW, params: list[torch.Tensor]) -> bool:
        state = optimizer.state
        return (len(params) == len(self.params) and all(p is q for p, q in zip(params, self.params))
                and all(state.get(p) is st for p, st in zip(params, self.states))
                and [p.data_ptr() for p in params] == self.data)


def _pointers(tensors: list[torch.Tensor | None]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(None if t is None else t.data_ptr() for t in tensors))


def _adamw_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor] | None:
    """The parameters with gradients, if adamw_step may take this optimizer: a torch.optim.AdamW
    without amsgrad/maximize/capturable/differentiable and with float lrs, with dense contiguous
    fp32 CPU gradients (the parameters themselves are checked where a plan is made); else None."""
    if not isinstance(optimizer, torch.optim.AdamW) or load() is None:  # accel.cpu.optim.AdamW subclasses it
        return None
    out = []
    for group in optimizer.param_groups:
        if (group.get("amsgrad") or group.get("maximize") or group.get("capturable") or group.get("differentiable")
                or isinstance(group["lr"], torch.Tensor)):
            return None
        out += [p for p in group["params"] if p.grad is not None]
    return out if all(_fp32_cpu_dense(p.grad) for p in out) else None


def _fp32_cpu_dense(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.layout == torch.strided and t.is_contiguous()


def adamw_step(optimizer: torch.optim.Optimizer, max_norm: float, threads: int) -> float | None:
    """torch.nn.utils.clip_grad_norm_(params, max_norm) (when max_norm > 0) and then optimizer.step(),
    in two passes of csrc/adamw.c over all the tensors on `threads` threads: the gradients' norm, then
    the AdamW update with the clipping factor applied on the fly (the gradients are left as they
    are). PyTorch takes a pass per op and per tensor group, single-threaded inside a split step.

    The optimizer's state (step, exp_avg, exp_avg_sq) is PyTorch's own, so its state_dict, a
    checkpoint and a resume are unchanged. Returns the total gradient norm (NaN when max_norm <= 0;
    a non-finite norm is returned without an update), or None without doing anything when the optimizer or its tensors are not ones it takes
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
        if not math.isfinite(norm):
            return norm  # no update: clipping by a non-finite norm would make every weight NaN
        scale = min(max_norm / (norm + 1e-6), 1.0)  # clip_grad_norm_'s factor
    plan.steps += 1
    hp = np.empty((len(params), 6))  # per tensor: lr, weight decay, beta1, beta2, eps, step
    hp[:, :5] = np.array([(g["lr"], g["weight_decay"], *g["betas"], g["eps"]) for g in optimizer.param_groups])[
        plan.group_of]
    hp[:, 5] = plan.steps.numpy()
    if not lib.sg_adamw(plan.p_ptrs, grads, plan.m_ptrs, plan.v_ptrs, plan.sizes, hp.ctypes.data, len(params),
                        scale, threads):
        raise MemoryError("optimizer step: no memory for the work list")
    return norm
