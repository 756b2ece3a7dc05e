"""What a prepared dataset's folder holds, named in one place.

Every module that writes or reads a dataset folder takes the names from here (`data.prepare`,
`data.shards`, `training.dataset`, `evaluate`, `config`):

    meta.json             META_FILE: what the folder holds (FORMAT, FORMAT_VERSION; see data.prepare)
    tokenizer/            TOKENIZER_DIR: the tokenizer, as Tokenizer.save writes it (the files inside
                          are the tokenizer's own: simplegpt.tokenizer.SPEC_FILE and its siblings)
    train_000000.bin ...  shard_name(TRAIN, i): flat little-endian token ids, dtype token_dtype(vocab)
    val_000000.bin ...    shard_name(VAL, i): the validation split, the tail of the token stream
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

META_FILE = "meta.json"
FORMAT = "simplegpt-dataset"  # meta.json's "format": what tells a dataset folder from any other
FORMAT_VERSION = 1
TOKENIZER_DIR = "tokenizer"
TRAIN, VAL = "train", "val"  # the splits: shard name prefixes and meta.json's keys


def shard_name(split: str, index: int) -> str:
    """The file name of a split's index-th shard: shard_name("train", 0) == "train_000000.bin"."""
    return f"{split}_{index:06d}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    """The shards' dtype: uint16 while every id fits (vocab_size < 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


def is_dataset_dir(path: str | os.PathLike | None) -> bool:
    """Whether path is a prepared dataset's folder (it holds META_FILE); False for "" and None."""
    return bool(path) and (Path(path) / META_FILE).is_file()
