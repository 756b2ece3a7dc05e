"""Where a run's weights start: random init from cfg.model, a checkpoint or Hugging Face GPT-2 to
fine-tune (init_from), or a run being resumed; and the random state that exact resume restores."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn

from .. import checkpoint as ckpt
from ..config import ARCHITECTURE_KEYS, GPT2_MODEL_VALUES, MODEL_KEYS, TrainConfig
from ..errors import CheckpointError, ConfigError
from ..model import GPT, GPTConfig
from ..tokenizer import Tokenizer

# The keys a resumed run cannot change: its weights have this shape, its data this tokenizer and its
# saved optimizer state this optimizer's layout.
# The optimizer's hyperparameters come back with its saved state (its param_groups), so a new value
# given to a resumed run would go unused: they are refused as the optimizer itself is.
OPTIMIZER_STATE_KEYS = ("beta1", "beta2", "weight_decay", "muon_momentum", "adamw_lr_ratio")
RESUME_FIXED = (*ARCHITECTURE_KEYS, "tokenizer", "optimizer", *OPTIMIZER_STATE_KEYS, "lora", "lora_alpha",
                "lora_targets")
# The keys a fine-tune cannot change: its weights have the init_from model's shape (a smaller block_size
# crops the position table, and dropout is set on the loaded model).
INIT_FIXED = tuple(key for key in ARCHITECTURE_KEYS if key != "block_size")
# GPTConfig fields whose None stands for a value computed from the others: compared as that value.
_RESOLVED = {"n_kv_head": "kv_heads", "head_size": "head_dim", "intermediate_size": "ffn_size"}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _set_dropout(model: GPT, p: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = p
    model.config = GPTConfig(**{**model.config.to_dict(), "dropout": p})


def _is_simplegpt_checkpoint(path: Path) -> bool:
    try:
        ckpt.read_checkpoint_config(path)
        return True
    except CheckpointError:
        return False


def init_model(cfg: TrainConfig, device: torch.device) -> tuple[GPT | None, Tokenizer | None, str]:
    """For init_from: the loaded model (cropped to block_size, with cfg's dropout), its tokenizer and a
    log line; (None, None, "") otherwise. ConfigError for a block_size beyond the model's n_positions,
    CheckpointError for weights that cannot be loaded or have no tokenizer."""
    if not cfg.init_from:
        return None, None, ""
    src = Path(cfg.init_from)
    if _is_simplegpt_checkpoint(src):  # its newest complete copy, as --resume finds it, mid-swap too
        loaded = ckpt.load_checkpoint(src, device="cpu")
    else:
        try:
            from ..hf import load_hf_model
        except ImportError as e:
            raise CheckpointError(f"init_from {cfg.init_from!r} is not a simplegpt checkpoint and Hugging Face "
                                  f"import is unavailable ({e})") from None
        loaded = load_hf_model(cfg.init_from)
    if loaded.tokenizer is None:
        raise CheckpointError(f"{cfg.init_from} has no tokenizer; it cannot be fine-tuned on text")
    model = loaded.model
    if cfg.block_size > model.config.n_positions:
        raise ConfigError(f"block_size {cfg.block_size} exceeds the n_positions {model.config.n_positions} of "
                          f"{cfg.init_from}; use --block_size {model.config.n_positions} or less")
    if cfg.block_size < model.config.n_positions:
        model.crop_block_size(cfg.block_size)
    _set_dropout(model, cfg.dropout)
    return model.to(device), loaded.tokenizer, f"initialized from {cfg.init_from}"


def init_shape(source: str) -> GPTConfig:
    """The shape of init_from's model (a simplegpt checkpoint, or a Hugging Face directory or hub
    name) from its config alone, without its weights. CheckpointError as init_model."""
    if _is_simplegpt_checkpoint(Path(source)):
        return ckpt.describe_checkpoint(source).config
    try:
        from ..hf import hf_model_config
    except ImportError as e:
        raise CheckpointError(f"init_from {source!r} is not a simplegpt checkpoint and Hugging Face import is "
                              f"unavailable ({e})") from None
    return hf_model_config(source)


def check_init_overrides(cfg: TrainConfig, given: Iterable[str]) -> None:
    """ConfigError for a [model] key among `given` (those set on the command line) whose value in cfg
    is not the shape of cfg.init_from's model, which a fine-tune keeps (INIT_FIXED): the run would
    train that shape and leave the key unused without a word. A key given with the model's own value
    (a whole config written out as options) passes."""
    keys = [key for key in given if key in INIT_FIXED]
    if not cfg.init_from or not keys:
        return
    shape = init_shape(cfg.init_from)
    for key in keys:
        attr = MODEL_KEYS[key][0]
        read = _RESOLVED.get(attr, attr)
        try:
            wanted = getattr(dataclasses.replace(shape, **{attr: getattr(cfg.model, attr)}), read)
        except ValueError:  # a value that does not even fit the model's other keys
            wanted = None
        if wanted != getattr(shape, read):
            raise ConfigError(f"cannot fine-tune {cfg.init_from} with {key}={getattr(cfg, key)!r}: the model has "
                              f"{key}={getattr(shape, read)!r}, and a fine-tune keeps its shape (block_size and "
                              f"dropout aside); drop that override, or train a new model without --init-from")


def load_resume(path: Path, cfg: TrainConfig, device: torch.device) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """The model, tokenizer and train state of checkpoint `path` to resume with cfg; ConfigError when cfg
    changes what a resumed run cannot (RESUME_FIXED), CheckpointError for a damaged checkpoint."""
    loaded = ckpt.load_checkpoint(path, device="cpu")
    state = ckpt.load_train_state(path)
    check_resume_compatible(loaded.metadata.get("train_config", {}), cfg, path)
    if loaded.tokenizer is None:
        raise CheckpointError(f"{path} has no tokenizer; it cannot be resumed")
    if cfg.lora:  # its weights are merged with the adapters: the frozen base comes back exactly
        from .lora import restore_base
        restore_base(loaded.model, path)
    return loaded.model.to(device), loaded.tokenizer, state


def check_resume_compatible(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    """Refuse overrides that change the model's shape, tokenizer, optimizer or the hyperparameters its
    saved state holds (OPTIMIZER_STATE_KEYS) of a run being resumed
    (saved: the checkpoint's flat train_config, as every version of the trainer wrote it)."""
    if saved:  # one saved before the Llama-style keys existed is GPT-2
        saved = {**GPT2_MODEL_VALUES, **saved}
    for key in RESUME_FIXED:
        if key in saved and saved[key] != getattr(cfg, key):
            raise ConfigError(f"cannot resume {path} with {key}={getattr(cfg, key)!r}: the checkpoint has "
                              f"{key}={saved[key]!r}; drop that override, or start a new run with --init-from {path}")
