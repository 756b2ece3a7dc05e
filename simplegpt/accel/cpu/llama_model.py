"""A training step's loss for a model with the Llama-style options, the whole model in one call of
csrc/llama_model.c each way (sg_llama_fwd/bwd), as training.model_loss runs a GPT-2 model's.

Op by op (llama_ops under the training twin) such a model runs about a dozen autograd nodes per
layer with Python between them; at small sizes that overhead, and the GIL the threads of a split
step (training/core_shards.py) queue for between ops, are a large share of a step.
`usable` says which models and steps the C pass takes (the rest keep the op-by-op path):

    norm        RMSNorm (gain or none) or LayerNorm (with its gain; bias or none), one epsilon
    positions   rotary (rope_theta; tables built once per length) or learned (wpe)
    attention   n_head query heads over n_kv_head key/value heads (grouped-query), head sizes of
                8, 16 or a multiple of 32, QK-norm with or without gains, 2..256 positions
    MLP         SwiGLU (c_fc = gate | up), ReLU^2 or GPT-2's tanh-GELU; biases on or off
    head        tied to the token embedding or its own weight (no bias)
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from ...model import IGNORE_INDEX, rotary_angles
from .decode import LLAMA_SLOTS, MLP_KINDS, NORM_KINDS  # csrc/llama.h's slots and its MLP_* and NORM_* orders
from .lib import load
from .llama_ops import head_size_ok
from .training import WholeModelPlan, _pointers, step_ok

_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class _LlamaModelLoss(torch.autograd.Function):
    """GPT.forward's mean cross-entropy for a training step, in one call of sg_llama_fwd and one of
    sg_llama_bwd: no logits leave it, and nothing runs in Python or autograd between the layers."""

    @staticmethod
    def forward(ctx, idx, targets, plan, rope, *params):
        B, T = idx.shape
        lib = load()
        L, M = plan.L, B * T
        cos, sin = rope
        dims = plan.dims()
        bufs = ([torch.empty((L + 1) * M * plan.C)]
                + [torch.empty(lib.sg_llama_saved_floats(B, T, dims, cos is not None)) for _ in range(L)]
                + [torch.empty(lib.sg_gpt_head_floats(B, T, plan.C, plan.V))])
        loss, count = ctypes.c_double(), ctypes.c_long()
        rc = lib.sg_llama_fwd(idx.data_ptr(), targets.data_ptr(), B, T, plan.V, L, dims, _ptr(cos), _ptr(sin),
                              plan.eps, plan.qk_eps, _pointers(params), _pointers(bufs), ctypes.byref(loss),
                              ctypes.byref(count))
        if rc < 0:
            raise ValueError(f"target token ids must be in 0..{plan.V - 1} or {IGNORE_INDEX} (no loss)")
        if rc == 0:
            raise MemoryError("causal attention: no memory for the kernel's scratch buffers")
        ctx.save_for_backward(idx, targets, *bufs, *params)
        ctx.plan, ctx.count, ctx.rope = plan, count.value, rope
        return torch.tensor(loss.value, dtype=torch.float32)

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss: torch.Tensor):
        plan = ctx.plan
        idx, targets, *rest = ctx.saved_tensors
        B, T = idx.shape
        bufs, params = rest[:plan.L + 2], rest[plan.L + 2:]
        grads = [torch.empty_like(p) if need else None for p, need in zip(params, ctx.needs_input_grad[4:])]
        scale = float(dloss) / ctx.count if ctx.count else 0.0
        cos, sin = ctx.rope
        n_positions = params[1].size(0) if params[1] is not None else 0
        if not load().sg_llama_bwd(idx.data_ptr(), targets.data_ptr(), B, T, plan.V, plan.L, plan.dims(),
                                   _ptr(cos), _ptr(sin), scale, _pointers(params), _pointers(bufs),
                                   _pointers(grads), n_positions):
            raise MemoryError("model backward: no memory for the kernels' work buffers")
        return (None, None, None, None, *grads)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _norm_kind(m: nn.Module) -> str | None:
    """"rmsnorm" or "layernorm" for a norm over one dimension the kernels take, else None."""
    if isinstance(m, nn.RMSNorm):
        return "rmsnorm" if m.eps is not None and len(m.normalized_shape) == 1 else None
    if isinstance(m, nn.LayerNorm):  # the kernel needs its gain
        return "layernorm" if m.weight is not None and len(m.normalized_shape) == 1 else None
    return None


class _LlamaPlan(WholeModelPlan):
    """What usable and loss need of a model, found once (as training._ModelPlan for GPT-2): its
    parameters in sg_llama_fwd's order with the module and name each sits at, its shape, and the
    checks that cannot change without a new plan."""

    def __init__(self, model: nn.Module):
        cfg, tr = model.config, model.transformer
        self.h, self.head = tr.h, model.lm_head
        # the weights as the modules' own parameters (None where a wrapper, e.g. peft's, holds them)
        wte_w, head_w = tr.wte._parameters.get("weight"), self.head._parameters.get("weight")
        tied = head_w is not None and head_w is wte_w
        wpe = tr["wpe"] if "wpe" in tr else None
        self.slots: list[tuple[nn.Module, str] | None] = [
            (tr.wte, "weight"), None if wpe is None else (wpe, "weight"), None if tied else (self.head, "weight")]
        for b in tr.h:
            self.slots += [(b.get_submodule(mod), name) if _has(b, mod) else None for mod, name in LLAMA_SLOTS]
        self.slots += [(tr.ln_f, "weight"), (tr.ln_f, "bias")]
        self.params = [None if s is None else s[0]._parameters.get(s[1]) for s in self.slots]
        self.dropouts = [tr.drop] + [d for b in tr.h for d in (b.attn.resid_dropout, b.mlp.dropout)]
        self.attn = [b.attn for b in tr.h]
        self.L, self.C, self.V = len(tr.h), cfg.n_embd, 0 if wte_w is None else wte_w.size(0)
        self.rotary = wpe is None
        self._tables: dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]] = {}
        self.static_ok = (isinstance(tr.wte, nn.Embedding) and isinstance(self.head, nn.Linear)
                          and wte_w is not None and head_w is not None and self.head.bias is None
                          and len(tr.h) > 0 and all(plain_block(b) for b in tr.h) and self._check(model, cfg))

    def _check(self, model: nn.Module, cfg) -> bool:
        tr = model.transformer
        if self.rotary != (cfg.positions == "rotary"):
            return False
        a0, m0 = tr.h[0].attn, tr.h[0].mlp
        H, K, D, C = a0.n_head, a0.n_kv_head, a0.head_dim, self.C
        kind, qk = _norm_kind(tr.ln_f), hasattr(a0, "q_norm")
        if kind is None or m0.kind not in MLP_KINDS or not head_size_ok(D) or H % K or (self.rotary and D % 2):
            return False
        F = m0.c_proj.weight.size(1)
        self.H, self.K, self.D, self.F = H, K, D, F
        self.mlp, self.norm, self.qk_norm = MLP_KINDS.index(m0.kind), NORM_KINDS.index(kind), int(qk)
        self.eps = tr.ln_f.eps
        self.qk_eps = a0.q_norm.eps if qk else 0.0
        W, F2 = (H + 2 * K) * D, 2 * F if m0.kind == "swiglu" else F
        for b in tr.h:
            a, m = b.attn, b.mlp
            if (_norm_kind(b.ln_1) != kind or _norm_kind(b.ln_2) != kind or b.ln_1.eps != self.eps
                    or b.ln_2.eps != self.eps or (a.n_head, a.n_kv_head, a.head_dim) != (H, K, D)
                    or m.kind != m0.kind or hasattr(a, "q_norm") != qk or getattr(m.gelu, "approximate", "") != "tanh"):
                return False
            if qk and not all(_norm_kind(n) == "rmsnorm" and n.eps == self.qk_eps and n.normalized_shape == (D,)
                              for n in (a.q_norm, a.k_norm)):
                return False
            shapes = {"attn.c_attn": (W, C), "attn.c_proj": (C, H * D), "mlp.c_fc": (F2, C), "mlp.c_proj": (C, F)}
            if any(not isinstance(b.get_submodule(path), nn.Linear) or b.get_submodule(path).weight.shape != want
                   for path, want in shapes.items()):
                return False
        if any(n.normalized_shape != (C,) for b in tr.h for n in (b.ln_1, b.ln_2)) or tr.ln_f.normalized_shape != (C,):
            return False
        if tr.wte.weight.shape != (self.V, C) or self.head.weight.shape != (self.V, C):
            return False
        return self.rotary or self.params[1] is not None  # biases and gains may be missing (NULL)

    def current(self, model: nn.Module) -> bool:
        return (model.transformer.h is self.h and model.lm_head is self.head
                and all(s is None and p is None or s is not None and s[0]._parameters.get(s[1]) is p
                        for s, p in zip(self.slots, self.params)))


    def dims(self) -> ctypes.Array:
        """csrc/llama.h's dims array."""
        return (ctypes.c_int * 8)(self.C, self.H, self.K, self.D, self.F, self.mlp, self.norm, self.qk_norm)

    def rope(self, config, T: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The rotary cos and sin (T, D / 2) of positions 0..T-1 for the model's GPTConfig, as
        model.rotary_angles computes them (built once per length); (None, None) with learned positions."""
        if not self.rotary:
            return None, None
        key = (T, config.rope_theta)
        if key not in self._tables:
            cos, sin = rotary_angles(config, torch.arange(T)[None])  # (1, 1, T, D), both halves equal
            self._tables[key] = tuple(t[0, 0, :, :self.D // 2].contiguous() for t in (cos, sin))
        return self._tables[key]


def _has(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
    except AttributeError:
        return False
    return True


def plain_block(block: nn.Module) -> bool:
    """Whether each of the block's linear weights is its module's own parameter: a layer wrapped by an
    adapter (peft's LoRA) computes more than its weight, which the kernels would read alone."""
    return all(_has(block, p) and "weight" in block.get_submodule(p)._parameters for p in _LINEARS)


def _plan(model: nn.Module) -> _LlamaPlan:
    plan = model.__dict__.get("_simplegpt_llama_plan")
    if plan is None or not plan.current(model):
        plan = _LlamaPlan(model)
        model.__dict__["_simplegpt_llama_plan"] = plan
    return plan


def usable(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> bool:
    """Whether loss() may take this step of a model.GPT: training.step_ok (gradients on, no autocast or
    compile, torch's sgemm found, idx and targets (B, T) with 2..min(n_positions, 256) positions), no
    dropout in training, fp32 contiguous CPU parameters, and a model of the options in the module
    docstring (the same norm kind and epsilon everywhere, a tanh-GELU where the MLP is GELU)."""
    return step_ok(model, idx, targets) and _plan(model).usable_now(model.training)


def loss(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """model(idx, targets)[1] (a model.GPT) for usable() steps, as one autograd node: a scalar tensor.
    ValueError for a target outside the vocabulary that is not IGNORE_INDEX."""
    plan = _plan(model)
    return _LlamaModelLoss.apply(idx.long().contiguous(), targets.long().contiguous(), plan,
                                 plan.rope(model.config, idx.size(1)), *plan.params)
