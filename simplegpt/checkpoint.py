"""The checkpoint format, written and read here only.

A checkpoint is a directory:
    model.safetensors   weights (the tied head stored once, as transformer.wte.weight)
    config.json         {"format": "simplegpt", "version": 1, "model": GPTConfig fields, ...metadata}
    tokenizer/          the tokenizer (tokenizer.json)
    train_state.pt      optional: optimizer, scheduler, RNG and sampler state for exact resume

It is written into a temporary sibling directory and swapped in with os.replace, so a crash
mid-write never damages the checkpoint that was there before.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_dir
from .devices import resolve_device
from .errors import CheckpointError
from .model import GPT, GPTConfig
from .tokenizer import Tokenizer, load_tokenizer

FORMAT = "simplegpt"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
TRAIN_STATE_FILE = "train_state.pt"
TIED_KEY = "lm_head.weight"


@dataclass
class Checkpoint:
    model: GPT
    tokenizer: Tokenizer | None
    config: GPTConfig
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def model_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Weights to save: contiguous CPU tensors, the tied output head left out (it is wte)."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k != TIED_KEY}


def save_checkpoint(
    path: str | os.PathLike,
    model: GPT,
    tokenizer: Tokenizer | None = None,
    metadata: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (temp dir + os.replace) and return its path."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(model_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        cfg = getattr(model, "_orig_mod", model).config
        doc = {"format": FORMAT, "version": VERSION, "model": cfg.to_dict(), **(metadata or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE_FILE)
    return path


def read_checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a checkpoint, validated; raises CheckpointError with what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a simplegpt checkpoint: {CONFIG_FILE} is missing")
    try:
        doc = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is corrupted ({e}); use another checkpoint") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "model" not in doc:
        raise CheckpointError(f"{cfg_file} is not a simplegpt checkpoint config (format != {FORMAT!r})")
    if doc.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer simplegpt (format version {doc['version']})")
    return doc


def model_from_state(config: GPTConfig, state: dict[str, torch.Tensor]) -> GPT:
    """The model built around the weights: made on the meta device, so no random init is computed
    and thrown away (about 2 s at 124M on a CPU). Weights become float32, simplegpt's dtype.
    Raises RuntimeError (from load_state_dict) when names or shapes do not match the config."""
    with torch.device("meta"):
        model = GPT(config)
    state = {k: v.to(torch.float32) for k, v in state.items() if k != TIED_KEY}
    state[TIED_KEY] = state.get("transformer.wte.weight")
    model.load_state_dict(state, strict=True, assign=True)
    # assign=True gives each name its own Parameter; tie the head to the embedding again.
    model.lm_head.weight = model.transformer.wte.weight
    return model


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory written by save_checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = resolve_device(device)
    path = Path(path)
    doc = read_checkpoint_config(path)
    try:
        config = GPTConfig.from_dict(doc["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} holds an invalid model config: {e}") from None
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path} is incomplete: {WEIGHTS_FILE} is missing")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights} is truncated or corrupted ({e}); use another checkpoint") from None
    try:
        model = model_from_state(config, state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{weights} does not match its config.json: {first[-1] if first else e}") from None
    model.to(device).eval()
    tokenizer = load_tokenizer(path / TOKENIZER_DIR) if (path / TOKENIZER_DIR).is_dir() else None
    metadata = {k: v for k, v in doc.items() if k not in ("format", "version", "model")}
    return Checkpoint(model=model, tokenizer=tokenizer, config=config, metadata=metadata, path=path)


def load_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """The resume state saved beside the weights (optimizer, scheduler, RNG, sampler)."""
    f = Path(path) / TRAIN_STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{path} has no {TRAIN_STATE_FILE}: it cannot be resumed exactly")
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a damaged pickle/zip
        raise CheckpointError(f"{f} is truncated or corrupted ({type(e).__name__}); use another checkpoint") from None
