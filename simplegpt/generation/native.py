"""The native backend: decoding with the CPU kernels (simplegpt.accel.cpu.decode), applied from outside.

Its view of the model (backend.model_view) swaps, in the view only, every nn.Linear for a
NativeLinear and every simplegpt.quantize Int8Linear for a NativeInt8Linear: the same weights.
A NativeLinear's calls of up to MAX_ROWS rows without autograd (decode steps of up to 16
sequences, short prefills) take the gemv kernel; a NativeInt8Linear's calls in decode steps take
the int8 kernel (see there). A decode step of a plain GPT-2 model (model.Block blocks, linears
all fp32 or all int8) runs all its blocks in one DecodeBlocks call; other models run the view's
forward. The caller's model is never changed.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import ContextManager, Iterator

import torch
import torch.nn as nn

from ..accel.cpu import BLOCK_SLOTS, MAX_ROWS
from ..accel.cpu import decode as native
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


def _native_class(module: nn.Module) -> type | None:
    if type(module) is nn.Linear:
        return NativeLinear
    if type(module) is Int8Linear and module.qweight is not None:
        return NativeInt8Linear
    return None


def native_view(model: GPT) -> GPT | None:
    """The model's view with native linears (see the module docstring); None where it has no layer
    the kernels take (then the eager backend runs it)."""
    view = model_view(model, _native_class)
    if not any(isinstance(m, (NativeLinear, NativeInt8Linear)) for m in view.modules()):
        return None
    return view


def decode_blocks(view: GPT) -> list[BlockTensors] | None:
    """Each block's tensors in BLOCK_SLOTS order (and the int8 row scales of its linears) for
    native.DecodeBlocks, or None where the view's blocks are not plain GPT-2 blocks on the CPU with
    fp32 or int8 native linears, all of one kind (other options' blocks run the view's forward)."""
    if not view.config.is_gpt2:  # the kernels' block is GPT-2's
        return None
    blocks = []
    for block in view.transformer.h:
        if type(block) is not Block or type(block.attn) is not CausalSelfAttention or type(block.mlp) is not MLP:
            return None
        slots = [(block.get_submodule(path), name) for path, name in BLOCK_SLOTS]
        linears = [m for m, name in slots if name == "weight" and isinstance(m, (nn.Linear, Int8Linear))]
        kinds = {type(m) for m in linears}
        if kinds not in ({NativeLinear}, {NativeInt8Linear}):
            return None
        int8 = kinds == {NativeInt8Linear}
        tensors = [m.qweight if int8 and name == "weight" and isinstance(m, Int8Linear) else getattr(m, name)
                   for m, name in slots]
        scales = [m.scale for m in linears] if int8 else None
        floats = [t for t in tensors if t is not None and t.dtype != torch.int8] + (scales or [])
        if any(not (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()) for t in floats):
            return None
        blocks.append((tensors, scales))
    return blocks or None


class NativeBatch(Batch):
    """A Batch whose short forward passes run on the kernels' threads (native.decoding) and whose
    decode steps run the blocks in one DecodeBlocks call where the backend has a block plan."""

    def __init__(self, backend: "NativeBackend", batch_size: int):
        super().__init__(backend, batch_size)
        self.blocks: native.DecodeBlocks | None = None  # the pointers, gathered once per call
        if backend.blocks is not None and self.cache is not None:
            cfg = self.model.config
            self.blocks = native.DecodeBlocks(backend.blocks, self.cache.k, self.cache.v, cfg.n_head,
                                              cfg.layer_norm_epsilon)

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
        x = tr.wte(idx[:, 0]) + tr.wpe(self.next_pos[:, 0])  # (B, C)
        self.blocks(x, cache.length, mask)
        cache.advance(1)
        return tr.ln_f(x)


class NativeBackend(Backend):
    """The CPU kernels' backend (see the module docstring): `model` is native_view(model), `blocks`
    the DecodeBlocks plan (None: decode steps run the view's forward)."""

    name = "native"

    def __init__(self, view: GPT, device: torch.device, window: int, window_shift: int):
        super().__init__(view, device, window, window_shift, use_cache=True)
        self.blocks = decode_blocks(view)

    def new_batch(self, batch_size: int) -> NativeBatch:
        return NativeBatch(self, batch_size)

    def sampling(self) -> ContextManager:
        return native.decoding()
