"""The native backend: decoding with the CPU kernels (simplegpt.accel.cpu.decode), applied from outside.

Its view of the model (backend.model_view) swaps, in the view only, every nn.Linear for a
NativeLinear and every simplegpt.quantize Int8Linear for a NativeInt8Linear: the same weights.
A NativeLinear's calls of up to MAX_ROWS rows without autograd (decode steps of up to 16
sequences, short prefills) take the gemv kernel; a NativeInt8Linear's calls in decode steps take
the int8 kernel (see there). A decode step of a plain GPT-2 model (model.Block blocks, linears
all fp32 or all int8) runs all its blocks in one DecodeBlocks call, and one of a model with the
Llama-style options (RMSNorm, rotary positions, GQA, QK-norm, SwiGLU or ReLU^2) in one
LlamaDecodeBlocks call. Prefills, and decode steps of blocks neither call takes (adapters, mixed
linears), run the view's forward, whose RMSNorms, MLPs and attention also call kernels
(accel.cpu.modules' RMSNorm and LlamaMLP, and NativeAttention: rotary positions and, in decode
steps, grouped-query attention over the KV cache with native.attention_step). The caller's model
is never changed.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import ContextManager, Iterator

import torch
import torch.nn as nn

from ..accel.cpu import BLOCK_SLOTS, MAX_ROWS
from ..accel.cpu import decode as native
from ..accel.cpu import llama_ops, modules
from ..model import GPT, MLP, Block, CausalSelfAttention
from ..quantize import Int8Linear
from .backend import Backend, Batch, model_view

BlockTensors = tuple[list[torch.Tensor | None], list[torch.Tensor] | None]  # as native.DecodeBlocks takes them


class NativeLinear(nn.Linear):
    """nn.Linear whose inference calls of up to MAX_ROWS rows take the native matrix-vector kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.compile traces nn.Linear's forward: dynamo cannot trace a ctypes call.
        if not torch.compiler.is_compiling() and native.usable(x, self.weight):
            return native.linear(x, self.weight, self.bias)
        return super().forward(x)


_decode_step: contextvars.ContextVar[bool] = contextvars.ContextVar("simplegpt_decode_step", default=False)


@contextlib.contextmanager
def decode_step() -> Iterator[None]:
    """The block of a decode step (one new token per row; NativeBatch.decode_step opens it): inside it
    NativeInt8Linear takes the native int8 kernel."""
    token = _decode_step.set(True)
    try:
        yield
    finally:
        _decode_step.reset(token)


class NativeInt8Linear(Int8Linear):
    """Int8Linear whose calls in a decode step take the native int8 kernel, MAX_ROWS rows a call;
    elsewhere (prefills, where a GEMM is much faster) fbgemm's, as Int8Linear. Both round each input
    row to int8 with its own scale, and which one a row takes depends on the step, not on the rows
    beside it or on their number: a row's output is the same alone as in any batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_decode_step.get() and x.size(-1) == self.in_features and x.dtype == torch.float32
                and not torch.is_grad_enabled()):
            return super().forward(x)
        if x.numel() <= MAX_ROWS * self.in_features:
            return native.linear_int8(x, self.qweight, self.scale, self.bias)
        rows = x.reshape(-1, self.in_features).split(MAX_ROWS)  # more sequences than the kernel's rows
        y = torch.cat([native.linear_int8(part, self.qweight, self.scale, self.bias) for part in rows])
        return y.view(*x.shape[:-1], self.out_features)


class NativeAttention(modules.LlamaAttention):
    """Attention whose decode steps (one new token per row, over a KV cache) run native.attention_step
    on the cache's keys and values, and whose rotary positions and training-free causal attention
    take llama_ops' kernels (modules.LlamaAttention)."""

    def attend(self, qkv: torch.Tensor, mask: torch.Tensor | None, kv, rope=None) -> torch.Tensor:
        B, T, _ = qkv.shape
        if kv is None or T != 1 or torch.is_grad_enabled() or not llama_ops.usable(qkv) \
                or (mask is not None and not (mask.dim() == 4 and mask.dtype == torch.bool and mask.size(2) == 1)):
            return super().attend(qkv, mask, kv, rope)
        q, k, v = self.heads(qkv, rope)  # (B, H, 1, D), (B, K, 1, D) x 2
        k, v = kv.update(k, v)  # (B, K, S, D) views of the cache's slots
        # a decode step's (B, 1, 1, S) mask is its rows' padding: the new token is real in every row
        pad = None if mask is None else mask[:, 0, 0].long()
        y = native.attention_step(q[:, :, 0], k, v, k.size(2), pad)  # (B, H, D)
        return y.view(B, 1, self.n_head * self.head_dim)


_NATIVE: dict[type, type] = {nn.Linear: NativeLinear}
# Llama-style blocks' ops (a GPT-2 model's decode steps run DecodeBlocks instead)
_NATIVE_OTHER: dict[type, type] = {**_NATIVE, nn.RMSNorm: modules.RMSNorm, MLP: modules.LlamaMLP,
                                   CausalSelfAttention: NativeAttention}


def native_view(model: GPT) -> GPT | None:
    """The model's view with native linears (see the module docstring); None where it has no layer
    the kernels take (then the eager backend runs it)."""
    classes = _NATIVE if model.config.is_gpt2 else _NATIVE_OTHER

    def _native_class(module: nn.Module) -> type | None:
        if type(module) is Int8Linear and module.qweight is not None:
            return NativeInt8Linear
        return classes.get(type(module))

    view = model_view(model, _native_class)
    if not any(isinstance(m, (NativeLinear, NativeInt8Linear)) for m in view.modules()):
        return None
    return view


def decode_blocks(view: GPT) -> list[BlockTensors] | None:
    """Each block's tensors in BLOCK_SLOTS order for native.DecodeBlocks (a GPT-2 model), or in
    LLAMA_SLOTS order for native.LlamaDecodeBlocks (the other options), with the int8 row scales of
    its linears; None where the view's blocks are not plain blocks on the CPU with fp32 or int8 native
    linears, all of one kind (then its decode steps run the view's forward)."""
    gpt2 = view.config.is_gpt2
    attention, mlp = (CausalSelfAttention, MLP) if gpt2 else (NativeAttention, modules.LlamaMLP)
    blocks = []
    for block in view.transformer.h:
        if type(block) is not Block or type(block.attn) is not attention or type(block.mlp) is not mlp:
            return None
        # the kernel's norms: RMSNorm with or without a gain, LayerNorm with one
        if not gpt2 and not all((type(m) is modules.RMSNorm and m.eps is not None)
                                or (type(m) is nn.LayerNorm and m.weight is not None)
                                for m in block.modules() if isinstance(m, (nn.RMSNorm, nn.LayerNorm))):
            return None
        slots = [(_submodule(block, path), name) for path, name in (BLOCK_SLOTS if gpt2 else native.LLAMA_SLOTS)]
        # every projection: one wrapped by an adapter (LoRA) is of neither kind, and runs the view's forward
        linears = [m for m, name in slots
                   if name == "weight" and m is not None and not isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
        kinds = {type(m) for m in linears}
        if kinds not in ({NativeLinear}, {NativeInt8Linear}):
            return None
        int8 = kinds == {NativeInt8Linear}
        # None for a missing bias or gain, and for QK-norm's without QK-norm (RMSNorm has no bias)
        tensors = [m.qweight if int8 and name == "weight" and isinstance(m, Int8Linear) else getattr(m, name, None)
                   for m, name in slots]
        scales = [m.scale for m in linears] if int8 else None
        floats = [t for t in tensors if t is not None and t.dtype != torch.int8] + (scales or [])
        if any(not (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()) for t in floats):
            return None
        blocks.append((tensors, scales))
    return blocks or None


def _submodule(block: nn.Module, path: str) -> nn.Module | None:
    """block's submodule at path, None where it has none (QK-norm's without QK-norm)."""
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


class NativeBatch(Batch):
    """A Batch whose short forward passes run on the kernels' threads (native.decoding) and whose
    decode steps run the blocks in one DecodeBlocks (GPT-2) or LlamaDecodeBlocks call where the backend
    has a block plan."""

    def __init__(self, backend: "NativeBackend", batch_size: int):
        super().__init__(backend, batch_size)
        self.blocks: native.DecodeBlocks | None = None  # the pointers, gathered once per call
        if backend.blocks is not None and self.cache is not None:
            cfg = self.model.config
            if cfg.is_gpt2:
                self.blocks = native.DecodeBlocks(backend.blocks, self.cache.k, self.cache.v, cfg.n_head,
                                                  cfg.layer_norm_epsilon)
            else:
                block = self.model.transformer.h[0]
                qk_norm = getattr(block.attn, "q_norm", None)
                self.blocks = native.LlamaDecodeBlocks(backend.blocks, self.cache.k, self.cache.v, cfg, block.ln_1.eps,
                                                       cfg.rms_norm_eps if qk_norm is None else qk_norm.eps)

    def decode_step(self, last: list[int]) -> torch.Tensor:
        with decode_step():
            return super().decode_step(last)

    def kernels(self, rows: int) -> ContextManager:
        # torch on one thread beside the kernel's spinning workers (see native.decoding)
        return native.decoding() if rows <= MAX_ROWS else contextlib.nullcontext()

    def step_hidden(self, idx: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.blocks is None or idx.size(0) > MAX_ROWS:
            return super().step_hidden(idx, mask)
        tr, cache = self.model.transformer, self.cache
        pos = self.next_pos[:, 0].contiguous()  # (B,) each row's position: its real tokens so far
        x = tr.wte(idx[:, 0])  # (B, C)
        if "wpe" in tr:
            x = x + tr.wpe(pos)
        if isinstance(self.blocks, native.LlamaDecodeBlocks):
            self.blocks(x, cache.length, mask, pos)
        else:
            self.blocks(x, cache.length, mask)
        cache.advance(1)
        return tr.ln_f(x)


class NativeBackend(Backend):
    """The CPU kernels' backend (see the module docstring): `model` is native_view(model), `blocks`
    the DecodeBlocks or LlamaDecodeBlocks plan (None: decode steps run the view's forward)."""

    name = "native"

    def __init__(self, view: GPT, device: torch.device, window: int, window_shift: int):
        super().__init__(view, device, window, window_shift, use_cache=True)
        self.blocks = decode_blocks(view)

    def new_batch(self, batch_size: int) -> NativeBatch:
        return NativeBatch(self, batch_size)

    def sampling(self) -> ContextManager:
        return native.decoding()
