"""The checkpoint format, written and read here only.

A checkpoint is a directory:
    model.safetensors   weights (a tied head stored once, as transformer.wte.weight; an untied one as lm_head.weight)
    config.json         {"format": "simplegpt", "version": 1, "model": GPTConfig fields, ...metadata,
                         "sha256": {file name: hex digest} of every other file}
    tokenizer/          the tokenizer (tokenizer.json)
    dcp/                instead of model.safetensors in a sharded (FSDP2) checkpoint: the weights and
                        optimizer state as torch.distributed.checkpoint wrote them, one file per rank
                        (simplegpt.training.fsdp; `simplegpt consolidate` makes a plain checkpoint of it)
    train_state.pt      optional: optimizer, scheduler, RNG and sampler state for exact resume,
                        tensors and plain Python values only (numpy arrays are stored as tensors)

It is written into a temporary sibling directory, synced and swapped in (simplegpt.atomic), so a
crash or power cut mid-write never damages the checkpoint that was there before, and loading finds
the newest complete copy at any point of the swap. Loading checks each file against its recorded
sha256 (checkpoints from before the digests load unchecked) and unpickles the train state with
torch.load(weights_only=True), so a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from . import atomic
from .devices import resolve_device
from .errors import CheckpointError
from .files import sha256_file
from .model import GPT, GPTConfig
from .tokenizer import Tokenizer, load_tokenizer

FORMAT = "simplegpt"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
TRAIN_STATE_FILE = "train_state.pt"
SHARDED_METADATA = "dcp/.metadata"  # a sharded (FSDP2) checkpoint's weights: torch.distributed.checkpoint
TIED_KEY = "lm_head.weight"
CHECKSUMS = "sha256"  # the config.json key of the files' digests
NOT_METADATA = ("format", "version", "model", CHECKSUMS)

# What load_train_state checks before the trainer uses a state (a nested dict is a nested check).
TRAIN_STATE_FIELDS: dict[str, Any] = {
    "step": int, "tokens_seen": int, "best_val_loss": (int, float), "elapsed_s": (int, float),
    "optimizer": {"state": dict, "param_groups": list}, "scaler": dict, "sampler": {"rng": dict},
    "rng": {"torch": torch.Tensor, "numpy": tuple, "python": tuple},
}
# A numpy array (or scalar) in a train state is stored as {NUMPY: tensor, "scalar": bool}.
NUMPY = "__numpy__"
# Train states saved before NUMPY hold numpy's RNG key, a uint32 array: unpickling it runs no code
# but these constructors, which weights_only loading is allowed to call.
_NUMPY_GLOBALS = [np.zeros(1).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


@dataclass
class Checkpoint:
    model: GPT
    tokenizer: Tokenizer | None
    config: GPTConfig
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def model_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Weights to save: contiguous CPU tensors, a tied output head left out (it is wte)."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    tied = model.config.tie_word_embeddings
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if not (tied and k == TIED_KEY)}


def save_checkpoint(
    path: str | os.PathLike,
    model: GPT,
    tokenizer: Tokenizer | None = None,
    metadata: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    write_weights: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint directory atomically and durably (simplegpt.atomic) and return its path.
    Files get the permissions the umask gives ordinary files; config.json, written last, records
    their sha256. Raises OSError from the file system, naming the file (ENOSPC for a full disk);
    the previous checkpoint is then untouched.

    write_weights, when given, writes the weights into the temporary directory instead of
    model.safetensors (a sharded model's dcp/, simplegpt.training.fsdp.save_sharded); the files it
    writes are digested in config.json like the others. `model` then only gives the config."""
    path = Path(path)
    try:
        with atomic.atomic_dir(path) as tmp:
            if write_weights is not None:
                write_weights(tmp)
            else:
                _write_weights(model_state_dict(model), tmp / WEIGHTS_FILE)
            if tokenizer is not None:
                tokenizer.save(tmp / TOKENIZER_DIR)
            if train_state is not None:
                _write_train_state(_to_file(train_state), tmp / TRAIN_STATE_FILE)
            cfg = getattr(model, "_orig_mod", model).config
            doc = {"format": FORMAT, "version": VERSION, "model": cfg.to_dict(), **(metadata or {}),
                   CHECKSUMS: {name: sha256_file(tmp / name) for name in _files(tmp)}}
            (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
            # safetensors writes through a private (0600) temp file; the rest was created as config.json was
            mode = (tmp / CONFIG_FILE).stat().st_mode & 0o777
            for name in _files(tmp):
                os.chmod(tmp / name, mode)
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None  # a flush or fsync names no file: the checkpoint
    return path


def _write_weights(state: dict[str, torch.Tensor], file: Path) -> None:
    """safetensors' file, with its I/O errors as the OSError they are (its SafetensorError names
    only the OS error code: "... No space left on device (os error 28)")."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(state, str(file), metadata={"format": "pt"})
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(file)) from None


def _write_train_state(state: dict[str, Any], file: Path) -> None:
    """torch.save through a Python file, so that a failed write is the OSError it is, naming the
    file (given a path, torch reports a full disk as "RuntimeError: ... unexpected pos")."""
    with open(file, "wb", buffering=0) as f:  # unbuffered: closing after a failure writes nothing more
        try:
            torch.save(state, f)
        except RuntimeError as e:
            if not isinstance(e.__context__, OSError):
                raise
            raise OSError(e.__context__.errno, e.__context__.strerror, str(file)) from None


def recover(path: str | os.PathLike) -> Path | None:
    """Finish a save of `path` that a crash interrupted: the newest complete copy left beside it is
    renamed to `path`. Returns `path` when a checkpoint is there afterwards, else None. The loaders
    below find that copy without it; call it before testing whether `path` exists (as when a run
    folder is given for its last/). Raises OSError when the folder is not writable."""
    return atomic.recover(path)


def read_checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a checkpoint (of its newest complete copy, see recover), validated;
    raises CheckpointError with what is wrong."""
    return read_whole(path, _read_config)


# How many times a reader starts again because a save swapped another copy in while it read.
READ_ATTEMPTS = 50
T = TypeVar("T")


def read_whole(path: str | os.PathLike, read: Callable[[Path], T]) -> T:
    """read(folder) of the newest complete copy of the checkpoint `path` (see recover), all of it
    from one copy: when a save of `path` swapped another copy in while read ran (the copy to read
    is then another, or its config.json another file), read runs again on the new one, so a reader
    beside a trainer that saves sees the old copy or the new one, whole, never a mix. Raises what
    read raises (CheckpointError for a damaged copy); a file missing from a copy that did not change
    is a CheckpointError naming it."""
    path = Path(path)
    for _ in range(READ_ATTEMPTS):
        before = _copy_id(path)
        if before is None:
            raise CheckpointError(f"checkpoint {path} does not exist")
        try:
            result = read(before[0])
        except (CheckpointError, OSError) as e:
            if _copy_id(path) != before:
                continue  # a save moved the copy away while it was read: read the new one
            if isinstance(e, FileNotFoundError):
                raise CheckpointError(f"{path} is incomplete: {e.filename or e} is missing; use another "
                                      "checkpoint") from None
            raise
        if _copy_id(path) == before:
            return result
    raise CheckpointError(f"{path} was replaced {READ_ATTEMPTS} times while it was read (a run saving it very "
                          "often); try again, or read a copy of it")


def _copy_id(path: Path) -> tuple[Path, int, int] | None:
    """Which copy of checkpoint `path` a reader would read now: its folder and its config.json's
    inode and mtime (every save writes a new config.json); None when there is no copy."""
    folder = atomic.newest_complete(path)
    if folder is None:
        return None
    try:
        st = os.stat(folder / CONFIG_FILE)
    except OSError:
        return folder, -1, -1
    return folder, st.st_ino, st.st_mtime_ns


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        inside = [path / name for name in ("best", "last") if (path / name).is_dir()]  # a run folder's checkpoints
        hint = f"; it looks like a run folder: name its checkpoint, {inside[0]}" if inside else ""
        raise CheckpointError(f"{path} is not a simplegpt checkpoint: {CONFIG_FILE} is missing{hint}")
    try:
        doc = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is corrupted ({e}); use another checkpoint") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "model" not in doc:
        # a Hugging Face model folder: what the commands that take only a simplegpt checkpoint need done
        hf = (f"; it is a Hugging Face model (model_type {doc['model_type']!r}): convert it with "
              f"'simplegpt import-hf {path} OUT'" if isinstance(doc, dict) and "model_type" in doc else "")
        raise CheckpointError(f"{cfg_file} is not a simplegpt checkpoint config (format != {FORMAT!r}){hf}")
    if doc.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer simplegpt (format version {doc['version']})")
    sums = doc.get(CHECKSUMS, {})
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise CheckpointError(f"{cfg_file} is corrupted ({CHECKSUMS!r} is not a map of file names to digests); "
                              "use another checkpoint")
    return doc


def verify_files(path: Path, doc: dict[str, Any], names: list[str]) -> None:
    """Check the named files of the checkpoint directory `path` against the digests its config.json
    (`doc`) recorded; files recorded without a digest (older checkpoints) pass. Raises CheckpointError
    naming a file that is missing or differs."""
    sums = doc.get(CHECKSUMS, {})
    for name in names:
        if name not in sums:
            continue
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path} is incomplete: {name} is missing")
        if sha256_file(file) != sums[name]:
            raise CheckpointError(f"{file} is truncated or corrupted: its sha256 differs from the one recorded in "
                                  f"{CONFIG_FILE} when it was saved; use another checkpoint")


def _files(root: Path) -> list[str]:
    """Every file under root but config.json, as sorted relative POSIX paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).as_posix() != CONFIG_FILE)


def model_from_state(config: GPTConfig, state: dict[str, torch.Tensor]) -> GPT:
    """The model built around the weights: made on the meta device, so no random init is computed
    and thrown away (about 2 s at 124M on a CPU). Weights become float32, simplegpt's dtype.
    Raises RuntimeError (from load_state_dict) when names or shapes do not match the config; the
    number of blocks is compared first, so a config.json with a huge n_layer builds nothing."""
    if (why := _blocks_mismatch(config, state)) is not None:
        raise RuntimeError(why)
    with torch.device("meta"):
        model = GPT(config)
    tied = config.tie_word_embeddings
    state = {k: v.to(torch.float32) for k, v in state.items() if not (tied and k == TIED_KEY)}
    if tied:
        state[TIED_KEY] = state.get("transformer.wte.weight")
    model.load_state_dict(state, strict=True, assign=True)
    if tied:  # assign=True gives each name its own Parameter; tie the head to the embedding again.
        model.lm_head.weight = model.transformer.wte.weight
    return model


def _blocks_mismatch(config: GPTConfig, names: Any) -> str | None:
    """Why the weights named `names` (transformer.h.<i>.* per block) cannot be config's model
    because their number of blocks differs from n_layer; None when it is the same."""
    blocks = {int(m[1]) for name in names if (m := re.match(r"transformer\.h\.(\d+)\.", name))}
    if len(blocks) == config.n_layer and blocks == set(range(len(blocks))):  # never a set of n_layer items:
        return None  # a damaged config.json may name any number
    return f"the config has n_layer {config.n_layer}, the weights hold {len(blocks)} blocks"


def check_config_fits(config: GPTConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Check the model config against the shapes of its weights (name -> shape, a tied head left
    out) without building the model: the number of blocks, then each tensor's shape against a model
    of one block built on the meta device (which allocates nothing, whatever the sizes). Raises
    CheckpointError naming `where` (the config file) and the first difference."""
    why = _blocks_mismatch(config, shapes)
    if why is None:
        with torch.device("meta"):
            one = GPT(GPTConfig(**{**config.to_dict(), "n_layer": 1})).state_dict()
        want = {k: tuple(v.shape) for k, v in one.items() if not (config.tie_word_embeddings and k == TIED_KEY)}
        have = {re.sub(r"^transformer\.h\.\d+\.", "transformer.h.0.", k): tuple(v) for k, v in shapes.items()}
        if missing := sorted(want.keys() - have.keys()):
            why = f"the weights have no {missing[0]}"
        elif extra := sorted(have.keys() - want.keys()):
            why = f"the weights hold {extra[0]}, which the config's model has not"
        elif wrong := [k for k in sorted(want) if want[k] != have[k]]:
            why = f"{wrong[0]} is {list(have[wrong[0]])} in the weights, {list(want[wrong[0]])} for the config"
    if why is not None:
        raise CheckpointError(f"{where} does not match the weights beside it: {why}; use another checkpoint")


@dataclass
class CheckpointInfo:
    """What a checkpoint holds, read without building its model (describe_checkpoint)."""
    config: GPTConfig
    parameters: int  # a tied head counted once, as GPT.num_parameters
    tokenizer: str | None  # its kind ("char", "byte", "gpt2"), or None
    metadata: dict[str, Any]
    path: Path
    chat_template: bool = False  # whether its tokenizer stores a chat template


def describe_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """config.json, the weights' shapes (safetensors' header, or a sharded checkpoint's DCP
    metadata) and the tokenizer of checkpoint `path`, checked against one another and the recorded
    digests; the weights are not loaded and no model is built. Raises CheckpointError as
    load_checkpoint."""
    return read_whole(path, lambda folder: _describe(folder, Path(path)))


def _describe(folder: Path, path: Path) -> CheckpointInfo:
    from safetensors import SafetensorError, safe_open

    doc = _read_config(folder)
    config = _model_config(doc, folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file() and (folder / SHARDED_METADATA).is_file():
        from .training.dcp_safe import read_metadata

        verify_files(folder, doc, [SHARDED_METADATA])  # the shards are checked by what loads them
        saved = read_metadata(folder / Path(SHARDED_METADATA).parent).state_dict_metadata
        shapes = {k.removeprefix("model."): tuple(v.size) for k, v in saved.items()
                  if k.startswith("model.") and hasattr(v, "size")}
    elif weights.is_file():
        verify_files(folder, doc, [WEIGHTS_FILE])
        try:
            with safe_open(str(weights), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{weights} is truncated or corrupted ({e}); use another checkpoint") from None
    else:
        raise CheckpointError(f"{folder} is incomplete: {WEIGHTS_FILE} is missing")
    if config.tie_word_embeddings:
        shapes.pop(TIED_KEY, None)
    check_config_fits(config, shapes, str(folder / CONFIG_FILE))
    tokenizer = _load_tokenizer(folder, doc, config)
    return CheckpointInfo(config=config, parameters=sum(math.prod(s) for s in shapes.values()),
                          tokenizer=tokenizer.kind if tokenizer else None,
                          metadata={k: v for k, v in doc.items() if k not in NOT_METADATA}, path=path,
                          chat_template=bool(getattr(tokenizer, "chat_template", None)))


def _model_config(doc: dict[str, Any], folder: Path) -> GPTConfig:
    try:
        return GPTConfig.from_dict(doc["model"])
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE} holds an invalid model config: {e}") from None


def _load_tokenizer(folder: Path, doc: dict[str, Any], config: GPTConfig) -> Tokenizer | None:
    """The checkpoint's tokenizer/ (its files checked against their digests), or None; CheckpointError
    when it is damaged or has more tokens than the model."""
    if not (folder / TOKENIZER_DIR).is_dir():
        return None
    verify_files(folder, doc, [n for n in doc.get(CHECKSUMS, {}) if n.startswith(f"{TOKENIZER_DIR}/")])
    try:
        tokenizer = load_tokenizer(folder / TOKENIZER_DIR)
    except (OSError, ValueError, KeyError) as e:  # a missing, corrupted or foreign tokenizer.json
        if isinstance(e, FileNotFoundError) and not (folder / TOKENIZER_DIR).is_dir():
            raise  # the copy was moved away: read_whole reads the new one
        detail = f"its spec has no {e} field" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{folder / TOKENIZER_DIR} is damaged ({detail}); use another checkpoint") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{folder / TOKENIZER_DIR} is damaged: its {tokenizer.vocab_size} tokens do not fit the "
                              f"model's vocabulary of {config.vocab_size}; use another checkpoint")
    return tokenizer


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory written by save_checkpoint (its newest complete copy, see recover).
    Raises CheckpointError naming the file that is missing, corrupted or does not match config.json."""
    device = resolve_device(device)
    return read_whole(path, lambda folder: _load(folder, Path(path), device))


def _load(folder: Path, path: Path, device: torch.device) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    doc = _read_config(folder)
    config = _model_config(doc, folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file() and (folder / SHARDED_METADATA).is_file():
        raise CheckpointError(f"{path} is a sharded (FSDP2) checkpoint; consolidate it first: "
                              f"simplegpt consolidate {path}")
    if not weights.is_file():
        raise CheckpointError(f"{folder} is incomplete: {WEIGHTS_FILE} is missing")
    verify_files(folder, doc, [name for name in doc.get(CHECKSUMS, {}) if name != TRAIN_STATE_FILE])
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
    tokenizer = _load_tokenizer(folder, doc, config)
    metadata = {k: v for k, v in doc.items() if k not in NOT_METADATA}
    return Checkpoint(model=model, tokenizer=tokenizer, config=config, metadata=metadata, path=path)


def load_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """The resume state saved beside the weights (optimizer, scheduler, RNG, sampler), as the trainer
    gave it to save_checkpoint, numpy arrays included. Unpickled with weights_only=True: a file that
    holds anything but tensors and plain values is refused, never run. Raises CheckpointError naming
    the file when it is missing, corrupted, unsafe, or lacks a field of TRAIN_STATE_FIELDS."""
    return read_whole(path, lambda folder: _load_train_state(folder, Path(path)))


def _load_train_state(folder: Path, path: Path) -> dict[str, Any]:
    f = folder / TRAIN_STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{path} has no {TRAIN_STATE_FILE}: it cannot be resumed exactly")
    verify_files(folder, _read_config(folder), [TRAIN_STATE_FILE])
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            state = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise CheckpointError(f"{f} holds objects other than tensors and plain values, and unpickling them "
                                  "could run code; it was not loaded: use a checkpoint you trust") from None
        raise CheckpointError(f"{f} is truncated or corrupted ({type(e).__name__}); use another checkpoint") from None
    except Exception as e:  # torch raises many types for a damaged pickle/zip
        raise CheckpointError(f"{f} is truncated or corrupted ({type(e).__name__}); use another checkpoint") from None
    state = _from_file(state)
    _check_fields(state, TRAIN_STATE_FIELDS, f, "")
    _check_values(state, f)
    return state


def _check_values(state: dict[str, Any], f: Path) -> None:
    """What TRAIN_STATE_FIELDS cannot say: counts are not negative, and the optimizer's state is
    torch's shape of it (a dict per parameter, parameter groups that list their parameters)."""
    def damaged(what: str) -> CheckpointError:
        return CheckpointError(f"{f} is damaged: {what}; use another checkpoint")

    for key in ("step", "tokens_seen"):
        if state[key] < 0:
            raise damaged(f"{key!r} is {state[key]}, a count that cannot be negative")
    if not all(isinstance(v, dict) for v in state["optimizer"]["state"].values()):
        raise damaged("'optimizer.state' holds a value that is not a dict of a parameter's state")
    for i, group in enumerate(state["optimizer"]["param_groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise damaged(f"'optimizer.param_groups' item {i} is not a parameter group (a dict with a 'params' list)")


def _check_fields(value: Any, fields: dict[str, Any], f: Path, where: str) -> None:
    if not isinstance(value, dict):
        what = f"its {where.rstrip('.')}" if where else "it"
        raise CheckpointError(f"{f} is not a simplegpt training state: {what} is a {type(value).__name__}, "
                              "expected dict; use another checkpoint")
    for key, kind in fields.items():
        name = where + key
        if key not in value:
            raise CheckpointError(f"{f} is not a complete training state: it has no {name!r}; use another checkpoint")
        if isinstance(kind, dict):
            _check_fields(value[key], kind, f, name + ".")
        elif not isinstance(value[key], kind) or (isinstance(value[key], bool) and kind is int):
            kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise CheckpointError(f"{f} is damaged: {name!r} is a {type(value[key]).__name__}, expected {kinds}; "
                                  "use another checkpoint")


def _to_file(obj: Any) -> Any:
    """obj with each numpy array or scalar replaced by {NUMPY: tensor, "scalar": bool}, so that
    weights_only loading can read it."""
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, _to_file(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_to_file(v) for v in obj)
    if isinstance(obj, (np.ndarray, np.generic)):
        return {NUMPY: torch.from_numpy(np.array(obj)), "scalar": isinstance(obj, np.generic)}  # a copy
    return obj


def _from_file(obj: Any) -> Any:
    """The inverse of _to_file."""
    if type(obj) in (dict, OrderedDict):
        if isinstance(obj.get(NUMPY), torch.Tensor):
            array = obj[NUMPY].numpy()
            return array[()] if obj.get("scalar") else array
        return type(obj)((k, _from_file(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_from_file(v) for v in obj)
    return obj
