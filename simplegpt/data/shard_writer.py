"""Writing token shards, for `prepare_corpus`: the train stream as it comes, then its tail moved
out into the validation split.

`ShardWriter` appends tokens to numbered shard files (layout.shard_name) of a fixed number of
tokens each; `split_tail` moves every token from a cut of the stream on into val shards once the
stream's length is known. A shard is described as {"file": name, "tokens": count}, as meta.json
lists them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from .layout import TRAIN, VAL, shard_name


class ShardWriter:
    """Appends tokens to numbered shard files SPLIT_000000.bin, ... of shard_tokens tokens each,
    opening the next file when one is full: only the token array being written is ever in memory."""

    def __init__(self, out: Path, split: str, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.shards: list[dict] = []  # {"file", "tokens"} of each file begun, in order
        self.tokens = 0
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        """Append a 1-D token array (the shards' dtype). OSError (a full disk among them) as the write raises it."""
        start = 0
        while start < len(tokens):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_file()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part = tokens[start:start + room]
            # a plain write: ndarray.tofile reports a full disk as an OSError without its errno
            self._file.write(memoryview(part).cast("B"))
            self.shards[-1]["tokens"] += len(part)
            self.tokens += len(part)
            start += len(part)

    def _next_file(self) -> None:
        self.close()
        name = shard_name(self.split, len(self.shards))
        self._file = open(self.out / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _empty_shard(out: Path, split: str) -> dict:
    name = shard_name(split, 0)
    (out / name).touch()
    return {"file": name, "tokens": 0}


def split_tail(out: Path, shards: list[dict], cut: int, dtype: np.dtype, chunk: int = 1 << 22) -> tuple[list, list]:
    """Move every token from position `cut` of the stream in the train shards to val shards:
    whole shards past the cut are renamed, the one shard the cut falls in has its tail copied
    (in chunks) and is truncated. Returns (train shards, val shards), each at least one (empty) file."""
    train: list[dict] = []
    val: list[dict] = []
    start = 0
    for shard in shards:
        n, path = shard["tokens"], out / shard["file"]
        if start + n <= cut:
            train.append(shard)
        elif start >= cut:
            name = shard_name(VAL, len(val))
            os.replace(path, out / name)
            val.append({"file": name, "tokens": n})
        else:
            keep = cut - start
            name = shard_name(VAL, len(val))
            with open(path, "rb") as src, open(out / name, "wb") as dst:
                src.seek(keep * dtype.itemsize)
                shutil.copyfileobj(src, dst, chunk)
            os.truncate(path, keep * dtype.itemsize)
            train.append({"file": shard["file"], "tokens": keep})
            val.append({"file": name, "tokens": n - keep})
        start += n
    return train or [_empty_shard(out, TRAIN)], val or [_empty_shard(out, VAL)]
