"""How an Engine runs its model: the one interface of the decode backends, and the eager backend.

An Engine picks its backend once, at construction (Engine.__init__):
- `Backend` (name "eager"): the model's own forward in PyTorch; the reference;
- `native.NativeBackend`: the CPU kernels (simplegpt.accel.cpu) for short prefills and decode steps;
- `compiled.CompiledBackend`: decode steps as one torch.compile'd function over a static cache.

A backend runs its own view of the model (`model_view`): new module objects over the caller's
Parameter objects (the same tensors, no copies), in eval mode, which the backend may change (swap
a module's class for one that calls a kernel) without touching the model it was handed. For each
generate/stream call it makes a `Batch`: the call's KV cache, padding mask and positions.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
import torch.nn as nn

from ..model import GPT
from ..views import module_view
from .cache import KVCache
from .text import Row


def model_view(model: nn.Module, swap: Callable[[nn.Module], type | None] | None = None) -> nn.Module:
    """A backend's view of model (simplegpt.views.module_view) in eval mode: generation never runs
    dropout, whatever mode the caller's model is in. Its forward does not check its input's values
    (GPT.check_inputs), which would sync with the host every step: the Engine checks prompts where
    they enter and keeps positions inside the window."""
    view = module_view(model, swap, training=False)
    view.check_inputs = False
    return view


class Batch:
    """The model-side state of one generate/stream call: its KV cache (None without one), padding
    mask and positions. Each call owns one, so streams of the same Engine can be interleaved
    (e.g. by a server)."""

    def __init__(self, backend: "Backend", batch_size: int):
        self.backend, self.model, self.device = backend, backend.model, backend.device
        self.cache: KVCache | None = None
        if backend.use_cache:
            dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
            self.cache = KVCache(self.model.config, batch_size, backend.window, self.device, dtype)
        self.mask: torch.Tensor | None = None  # (B, window) 1 = real token, when rows are padded
        self.next_pos = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)  # (B, 1)

    def kernels(self, rows: int) -> ContextManager:
        """Around a forward pass of `rows` token rows in all (the native backend's thread handover)."""
        return contextlib.nullcontext()

    def next_logits(self, rows: list[Row], active: list[int], still: list[int]) -> torch.Tensor:
        """Logits (B, V) for the next token of each row in `still` (a subset of `active`, in order)."""
        cache, window = self.cache, self.backend.window
        if cache is None or cache.length + 1 > cache.max_len:
            for i in still:
                row = rows[i]
                if len(row.tokens) - row.start > window:
                    row.start += self.backend.window_shift
            return self.prefill([rows[i] for i in still])
        if still != active:
            keep = torch.tensor([active.index(i) for i in still], device=self.device)
            with torch.inference_mode():
                cache.keep_rows(keep)
                self.next_pos = self.next_pos[keep]
                if self.mask is not None:
                    self.mask[: len(still)] = self.mask[keep]
        return self.decode_step([rows[i].tokens[-1] for i in still])

    @torch.inference_mode()
    def prefill(self, rows: list[Row]) -> torch.Tensor:
        """Encode each row's context (left-padded to a batch); fills the cache. Returns (B, V)."""
        contexts = [r.tokens[r.start:] for r in rows]
        B, L = len(contexts), max(len(c) for c in contexts)
        if all(len(c) == L for c in contexts):
            idx, self.mask = torch.tensor(contexts, device=self.device), None
        else:
            idx = torch.zeros(B, L, dtype=torch.long, device=self.device)
            self.mask = torch.zeros(B, self.backend.window, dtype=torch.long, device=self.device)
            for b, c in enumerate(contexts):
                idx[b, L - len(c):] = torch.tensor(c)
                self.mask[b, L - len(c):] = 1
        if self.cache is not None:
            self.cache.reset()
        self.next_pos = torch.tensor([[len(c)] for c in contexts], device=self.device)
        mask = None if self.mask is None else self.mask[:, :L]
        with self.kernels(B * L):
            h = self.model.hidden_states(idx, mask, kv_cache=self.cache)
            return self.model.lm_head(h[:, -1])  # the head on the last position only: (B, V)

    @torch.inference_mode()
    def decode_step(self, last: list[int]) -> torch.Tensor:
        """One cached step: the rows' last tokens (B, 1) at their next positions. Returns (B, V)."""
        cache, B = self.cache, len(last)
        idx = torch.tensor(last, device=self.device).view(B, 1)
        mask = None
        if self.mask is not None:
            self.mask[:B, cache.length] = 1
            mask = self.mask[:B, : cache.length + 1]
        with self.kernels(B):
            logits = self.model.lm_head(self.step_hidden(idx, mask))
        self.next_pos += 1
        return logits

    def step_hidden(self, idx: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """GPT.hidden_states of a decode step's tokens idx (B, 1), over the cache. Returns (B, C)."""
        return self.model.hidden_states(idx, mask, position_ids=self.next_pos, kv_cache=self.cache)[:, -1]

    def close(self) -> None:
        """The call is over (the cache goes with this object)."""


class Backend:
    """The eager backend, and the interface every backend keeps: `model` (the backend's view of
    the model, in eval mode), `new_batch(batch_size)` (a Batch for one call), `sampling()` (the
    context the engine samples in between steps) and `movable_rows` (whether its batches' rows may
    move between steps).

    use_cache=False re-encodes the whole context for every token: the slow reference path.
    """

    name = "eager"
    # Whether new_batch's batches let their caller move rows between steps, as continuous batching
    # does (cache rows swapped, dropped and re-aligned, rows joining mid-way); a backend whose batches
    # keep their rows in place (fixed shapes and addresses) says False, and such a caller runs its
    # steps through the plain Batch instead.
    movable_rows = True

    def __init__(self, model: GPT, device: torch.device, window: int, window_shift: int, use_cache: bool):
        self.model, self.device = model, device
        self.window, self.window_shift, self.use_cache = window, window_shift, use_cache

    def new_batch(self, batch_size: int) -> Batch:
        return Batch(self, batch_size)

    def sampling(self) -> ContextManager:
        return contextlib.nullcontext()
