"""The compiled backend (Engine(compile=True)): each decode step is the model's forward, compiled
whole by torch.compile (static_step), over a static cache (CUDA graphs on CUDA). Prefill and window re-encodes run
eagerly, as in the eager backend."""

from __future__ import annotations

import torch

from ..model import GPT
from ..quantize import Int8Linear
from .backend import Backend, Batch
from .text import Row


class _SlotKV:
    """One layer's whole (B, H, max_len, D) cache buffers for the compiled step: `update` writes
    the step's keys/values at slot (a 1-element tensor) and returns all max_len slots."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor):
        self.k, self.v, self.slot = k, v, slot

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, self.slot, k)
        self.v.index_copy_(2, self.slot, v)
        return self.k, self.v


class _SlotCache:
    """The KVCacheLike GPT.forward sees in a compiled step. Where the step writes (the slot) and
    what it reads (the mask) are tensors, so the cache's Python length stays 0 and advance does
    nothing: the one compiled graph serves every position (StaticBatch advances the real cache)."""

    length = 0

    def __init__(self, layers: list[_SlotKV]):
        self.layers = layers

    def advance(self, n: int) -> None:
        pass


def static_step(model: GPT, idx: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, real: torch.Tensor,
                ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
    """GPT.forward for one decode step whose shapes do not depend on the position, for
    torch.compile: logits (B, V). model's check_inputs must be off (it reads values on the host).

    idx, pos (B, 1): the rows' last tokens and their positions; slot (1,): the cache slot they are
    written to; real (B, max_len) bool: slots holding real tokens (False for left padding);
    ks, vs: each layer's (B, H, max_len, D) cache buffers, separate tensors, so that the compiled
    step writes one slot in place rather than copying a stacked cache. Every query attends over
    all max_len slots, masked to the real ones up to slot, and always to its own.
    """
    slots = torch.arange(real.size(1), device=real.device)
    keep = ((slots <= slot) & real) | (slots == slot)  # (B, M)
    cache = _SlotCache([_SlotKV(k, v, slot) for k, v in zip(ks, vs)])
    logits, _ = model(idx, attention_mask=keep[:, None, None, :], position_ids=pos, kv_cache=cache)
    return logits[:, -1]  # (B, 1, V) -> (B, V)


def check_compilable(model: GPT, use_cache: bool) -> None:
    """ValueError for an Engine(compile=True) that cannot run the compiled static-cache step."""
    if not use_cache:
        raise ValueError("compile=True needs the KV cache: drop use_cache=False (the uncached path is the reference)")
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ValueError("compile=True does not support int8-quantized models (their fbgemm kernels do not "
                         "compile): use one or the other")


class StaticBatch(Batch):
    """A Batch whose decode steps run the backend's compiled static_step.

    Its tensors keep their shapes and addresses (torch._dynamo.mark_static_address, for CUDA
    graphs) and the backend reuses the object for later calls of the same batch size, so one
    compilation (one CUDA graph) serves every step of them. Rows that finish stay in the batch:
    they go on being decoded and their logits are dropped, because compacting the batch would
    change its shape. Prefill and the re-encode of a full window run eagerly, as in Batch.
    """

    def __init__(self, backend: "CompiledBackend", batch_size: int):
        super().__init__(backend, batch_size)
        B, M, device = batch_size, backend.window, self.device
        self.idx = torch.zeros(B, 1, dtype=torch.long, device=device)  # (B, 1) each row's last token
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=device)  # (B, 1) its position
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the cache slot of this step
        self.real = torch.ones(B, M, dtype=torch.bool, device=device)  # (B, M) False = padding
        # The step reads every slot; masked ones get weight 0, but 0 * NaN from uninitialised memory is NaN.
        self.cache.k.zero_()
        self.cache.v.zero_()
        self.ks = [layer.k for layer in self.cache.layers]
        self.vs = [layer.v for layer in self.cache.layers]
        for t in (self.idx, self.pos, self.slot, self.real, *self.ks, *self.vs):
            torch._dynamo.mark_static_address(t)
        self.cache_row: dict[int, int] = {}  # id(Row) -> its row in the cache, set by prefill

    def next_logits(self, rows: list[Row], active: list[int], still: list[int]) -> torch.Tensor:
        if self.cache.length + 1 > self.cache.max_len:
            return super().next_logits(rows, active, still)  # slide the window: re-encode eagerly
        return self.static_step([rows[i] for i in still])

    @torch.inference_mode()
    def prefill(self, rows: list[Row]) -> torch.Tensor:
        """Batch.prefill into the first len(rows) cache rows. The other rows (finished ones, after a
        re-encode) are all padding to the compiled step: they attend to their own slot only."""
        logits = super().prefill(rows)
        n, L = len(rows), self.cache.length
        self.cache_row = {id(r): i for i, r in enumerate(rows)}
        self.real.fill_(True)
        if self.mask is not None:
            self.real[:n, :L] = self.mask[:, :L].bool()
        self.real[n:] = False
        self.pos.zero_()
        self.pos[:n] = self.next_pos
        return logits

    @torch.inference_mode()
    def static_step(self, rows: list[Row]) -> torch.Tensor:
        """One compiled step for the whole batch; returns the logits (len(rows), V) of `rows`."""
        cache, B = self.cache, self.idx.size(0)
        at = [self.cache_row[id(r)] for r in rows]
        self.idx[at, 0] = torch.tensor([r.tokens[-1] for r in rows], device=self.device)
        self.slot.fill_(cache.length)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs have been used
        logits = self.backend.step(self.model, self.idx, self.pos, self.slot, self.real, self.ks, self.vs)
        cache.advance(1)
        self.pos += 1
        return logits if len(at) == B else logits[at]

    def close(self) -> None:
        """Give the batch back to the backend for its next call with this many prompts."""
        self.backend.free.setdefault(self.idx.size(0), []).append(self)


class CompiledBackend(Backend):
    """Decode steps as one compiled static_step (see the module docstring). Dynamo compiles
    the step once per batch size (and model shape), on its first decode step."""

    name = "compiled"
    movable_rows = False  # its static batches keep their rows in place

    def __init__(self, model: GPT, device: torch.device, window: int, window_shift: int):
        check_compilable(model, use_cache=True)
        super().__init__(model, device, window, window_shift, use_cache=True)
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        self.step = torch.compile(static_step, fullgraph=True, dynamic=False, mode=mode)
        self.free: dict[int, list[StaticBatch]] = {}  # batch size -> StaticBatch objects no call is using

    def new_batch(self, batch_size: int) -> StaticBatch:
        free = self.free.get(batch_size)
        return free.pop() if free else StaticBatch(self, batch_size)
