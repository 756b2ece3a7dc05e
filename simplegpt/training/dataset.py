"""The prepared dataset a config names (prepared on first use) and the batch samplers over it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..config import TrainConfig, corpus_slug, tokenizer_slug
from ..data.layout import TRAIN, VAL, is_dataset_dir
from ..data.prepare import prepare_corpus
from ..data.samplers import PackedSampler, PaddedSampler
from ..data.shards import TokenShards, read_meta
from ..errors import DataError, UnknownCharacterError
from ..tokenizer import Tokenizer


def dataset_dir(cfg: TrainConfig) -> Path:
    """Where cfg's prepared dataset lives: data itself when it is one, else data_dir or a default."""
    if is_dataset_dir(cfg.data):
        return Path(cfg.data)
    if cfg.data_dir:
        return Path(cfg.data_dir)
    return Path("data") / f"{corpus_slug(cfg.data)}_{tokenizer_slug(cfg.tokenizer)}"


def prepare_data(cfg: TrainConfig, tokenizer: Tokenizer | None, progress: bool) -> tuple[Path, dict]:
    """Prepare cfg.data if needed (with a fixed tokenizer when fine-tuning / resuming); the dataset's
    folder and meta.json. DataError for no corpus, or a dataset of another tokenizer than the model's."""
    if not cfg.data or not cfg.data.strip():
        raise DataError("no corpus given: set data (--data) to a file, folder, glob, URL or 'shakespeare'")
    out = dataset_dir(cfg)
    if is_dataset_dir(cfg.data):
        meta = read_meta(out)
    else:
        try:
            meta = prepare_corpus(cfg.data, out, tokenizer or cfg.tokenizer, val_fraction=cfg.val_fraction,
                                  text_field=cfg.text_field, progress=progress, unknown_chars=cfg.unknown_chars,
                                  check_splits=lambda train, val: check_split_sizes(cfg, train, val))
        except UnknownCharacterError as e:
            model = cfg.init_from or "the run being resumed"
            raise UnknownCharacterError(
                f"{cfg.data} does not fit the tokenizer of {model}: {e}. That vocabulary is part of the model and "
                "cannot grow: --unknown_chars drop leaves those characters out of the training text, --unknown_chars "
                "' ' puts a space (or another character of the vocabulary) in their place, or a new model trained "
                "on this text (without --init-from) gets a vocabulary of its own", chars=e.chars) from None
    if tokenizer is not None and meta["tokenizer"] != tokenizer.spec():
        raise DataError(f"the dataset in {out} was prepared with a different tokenizer ({meta['tokenizer']['type']}, "
                        f"vocab {meta['vocab_size']}) than the model's ({tokenizer.kind}, vocab {tokenizer.vocab_size}); "
                        "use another data_dir or prepare it from the same tokenizer")
    return out, meta


def check_split_sizes(cfg: TrainConfig, train_tokens: int, val_tokens: int) -> None:
    """DataError when a split is too small for cfg's batches: packed windows need block_size + 1 tokens."""
    if cfg.batch_mode != "packed":
        return
    for name, tokens in (("train", train_tokens), ("validation", val_tokens)):
        if tokens <= cfg.block_size:
            raise DataError(f"the corpus is too small: its {name} split has {tokens} tokens, fewer "
                            f"than block_size + 1 = {cfg.block_size + 1}; use a smaller --block_size or more text")


def make_samplers(cfg: TrainConfig, data_dir: Path, meta: dict) -> tuple[Any, Callable[[], Any]]:
    """The train sampler and a factory of the (always identical) validation sampler."""
    train_shards, val_shards = TokenShards(data_dir, TRAIN), TokenShards(data_dir, VAL)
    if cfg.batch_mode == "padded":
        train = PaddedSampler.from_shards(train_shards, meta["eos_id"], cfg.block_size, cfg.batch_size, cfg.seed)
        val = lambda: PaddedSampler.from_shards(val_shards, meta["eos_id"], cfg.block_size,  # noqa: E731
                                                cfg.batch_size, cfg.seed + 1)
    else:
        check_split_sizes(cfg, train_shards.num_tokens, val_shards.num_tokens)
        train = PackedSampler(train_shards, cfg.block_size, cfg.batch_size, cfg.seed)
        val = lambda: PackedSampler(val_shards, cfg.block_size, cfg.batch_size, cfg.seed + 1)  # noqa: E731
    return train, val
