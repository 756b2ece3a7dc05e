"""Reading a prepared dataset: its meta.json (`read_meta`), a split's shards memory-mapped
(`TokenShards`), and its tokenizer (`load_dataset_tokenizer`). The folder's names are data.layout's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..tokenizer import Tokenizer, load_tokenizer
from .layout import FORMAT, META_FILE, TOKENIZER_DIR


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a prepared dataset directory; DataError when missing or damaged."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{data_dir} is not a prepared dataset ({META_FILE} missing); run 'simplegpt prepare' first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is corrupted ({e}); prepare the dataset again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not a simplegpt dataset description; prepare the dataset again")
    return meta



class TokenShards:
    """One split of a prepared dataset: its shards memory-mapped, read-only."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        meta = read_meta(data_dir)
        if split not in meta["shards"]:
            raise DataError(f"{data_dir} has no {split!r} split")
        dtype = np.dtype(meta["dtype"])
        self.arrays: list[np.ndarray] = []
        for shard in meta["shards"][split]:
            path = Path(data_dir) / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise DataError(f"{path} is missing or truncated; prepare the dataset again")
            arr = np.memmap(path, dtype=dtype, mode="r") if shard["tokens"] else np.zeros(0, dtype)
            self.arrays.append(arr)
        self.num_tokens = sum(len(a) for a in self.arrays)



def load_dataset_tokenizer(data_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer a dataset was prepared with (its tokenizer/ folder). ValueError or OSError as
    load_tokenizer raises them for a damaged or missing one."""
    return load_tokenizer(Path(data_dir) / TOKENIZER_DIR)
