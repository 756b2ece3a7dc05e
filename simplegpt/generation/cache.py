"""The KV cache: preallocated keys and values that GPT.forward(kv_cache=...) appends to in place."""

from __future__ import annotations

import torch

from ..model import GPTConfig


class _LayerKV:
    """One layer's (B, K, max_len, D) key and value buffers inside a KVCache."""

    def __init__(self, cache: "KVCache", k: torch.Tensor, v: torch.Tensor):
        self.cache, self.k, self.v = cache, k, v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.cache.length, self.cache.length + k.size(2)
        B = k.size(0)
        if end > self.cache.max_len or B > self.k.size(0):
            raise ValueError(f"KV cache overflow: {end} positions x {B} rows do not fit its "
                             f"{self.cache.max_len} x {self.k.size(0)}; reset it or make a larger one")
        self.k[:B, :, start:end].copy_(k)
        self.v[:B, :, start:end].copy_(v)
        return self.k[:B, :, :end], self.v[:B, :, :end]  # views over the filled prefix, no copies


class KVCache:
    """Preallocated keys/values, (n_layer, batch, K, max_len, head_dim) each, written in place, where
    K = config.kv_heads: a grouped-query model caches its n_kv_head key/value heads, not n_head.

    The first `length` slots hold the keys/values seen so far (of the leading rows, when a batch
    has shrunk); GPT.forward(kv_cache=...) appends, and raises ValueError when it would overflow.
    Static shapes mean no allocation per decode step.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        max_len = max_len or config.n_positions
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_dim)
        # Slots are always written before they are read, so the buffers need no zeroing.
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0
        self.layers = [_LayerKV(self, self.k[i], self.v[i]) for i in range(config.n_layer)]

    def reset(self) -> None:
        self.length = 0

    def advance(self, n: int) -> None:
        self.length += n

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Compact the batch to `rows` (indices of current rows), e.g. when others finished."""
        n, end = rows.numel(), self.length
        self.k[:, :n, :, :end] = self.k[:, rows, :, :end]
        self.v[:, :n, :, :end] = self.v[:, rows, :, :end]
