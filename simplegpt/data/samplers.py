"""Batches from a prepared dataset's shards, for training and evaluation.

`PackedSampler` draws seeded random windows of block_size + 1 tokens from the shards (its state is
saved in checkpoints for exact resume); `PaddedSampler` is the tutorial's mode, one short text per
row, padded, with an attention mask and IGNORE_INDEX labels on padding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..model import IGNORE_INDEX
from ..tokenizer import Tokenizer
from .shards import TokenShards


class PackedSampler:
    """Seeded random windows of block_size + 1 tokens: x = window[:-1], y = window[1:].

    A window never crosses a shard boundary; every start position of every shard is equally
    likely. The generator state is part of the checkpoint, so a resumed run draws the same
    batches as an uninterrupted one.
    """

    def __init__(self, shards: TokenShards, block_size: int, batch_size: int, seed: int):
        self.arrays = [a for a in shards.arrays if len(a) > block_size]
        if not self.arrays:
            raise DataError(
                f"the split has {shards.num_tokens} tokens, fewer than block_size + 1 = {block_size + 1}; "
                "use a smaller block_size or a bigger corpus"
            )
        self.block_size = block_size
        self.batch_size = batch_size
        # starts[i] = number of valid window starts in shards 0..i-1
        self.starts = np.cumsum([0] + [len(a) - block_size for a in self.arrays])
        self.window = np.arange(block_size + 1)
        self.rng = np.random.default_rng(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (batch_size, block_size) int64."""
        picks = self.rng.integers(0, self.starts[-1], size=self.batch_size)
        shard = np.searchsorted(self.starts, picks, side="right") - 1
        offsets = picks - self.starts[shard]
        batch = np.empty((self.batch_size, self.block_size + 1), np.int64)  # (B, T + 1)
        # one gather per shard drawn (a slice per row costs ~4x more at batch 32); not np.unique, whose
        # first call imports numpy.ma (~20 ms of the run's start)
        for s in sorted(set(shard.tolist())):
            rows = shard == s
            batch[rows] = self.arrays[s][offsets[rows, None] + self.window]
        batch = torch.from_numpy(batch)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


class PaddedSampler:
    """The tutorial's per-text batches: one document per row, cut to block_size + 1 tokens,
    padded with pad_id; batches are (x, y, attention_mask) with IGNORE_INDEX on padded targets."""

    def __init__(self, documents: list[np.ndarray], block_size: int, batch_size: int, pad_id: int, seed: int):
        self.docs = [np.asarray(d[: block_size + 1], dtype=np.int64) for d in documents if len(d) >= 2]
        if not self.docs:
            raise DataError("no text has at least 2 tokens: padded batches need texts to predict")
        self.block_size = block_size
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer: Tokenizer, block_size: int, batch_size: int,
                   seed: int = 0) -> "PaddedSampler":
        return cls([np.asarray(tokenizer.encode(t)) for t in texts], block_size, batch_size,
                   tokenizer.eos_id, seed)

    @classmethod
    def from_shards(cls, shards: TokenShards, eos_id: int, block_size: int, batch_size: int,
                    seed: int) -> "PaddedSampler":
        docs = []
        for arr in shards.arrays:
            ends = np.flatnonzero(np.asarray(arr) == eos_id)
            docs += np.split(np.asarray(arr), ends + 1)
        return cls(docs, block_size, batch_size, eos_id, seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, y, attention_mask: each (batch_size, T) with T the longest row in the batch."""
        picks = self.rng.integers(0, len(self.docs), size=self.batch_size)
        rows = [self.docs[i] for i in picks]
        T = max(len(r) for r in rows) - 1
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            r = torch.from_numpy(r)
            x[i, : len(r) - 1] = r[:-1]
            y[i, : len(r) - 1] = r[1:]
            mask[i, : len(r) - 1] = 1
        return x, y, mask

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
