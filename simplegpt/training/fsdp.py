"""FSDP2 and sharded checkpoints: the model's parameters, gradients and optimizer state split over
the ranks with `torch.distributed.fsdp.fully_shard`, saved and loaded with `torch.distributed.checkpoint`
(DCP), and turned back into the usual single-process checkpoint (`consolidate`).

Where FSDP2 runs (measured, tests/test_fsdp.py): torch 2.13.0's CPU build runs `fully_shard` on CPU
tensors over gloo, two processes under `torchrun --nproc_per_node 2` giving the losses of one process
that accumulates the same global batch (to 1e-5, with gradient sync only on the last micro-batch and
clip_grad_norm_ over the DTensor gradients), bf16 compute included. On CUDA simplegpt runs it over
nccl only (torchrun's GPU backend; FSDP2 over gloo on CUDA tensors was not measured).
The optimizer of a sharded model must be PyTorch's (torch.optim.AdamW, fused or not): the CPU
kernels' AdamW (simplegpt.accel.cpu.optim) reads parameters as plain tensors and crashed the process
(SIGSEGV) on DTensors, and the CPU training kernels (accel.cpu.for_training) do not apply either.

A sharded checkpoint is the usual checkpoint directory (simplegpt.checkpoint) with the weights and
the optimizer state in `dcp/` instead of model.safetensors:
    dcp/.metadata             DCP's index of every tensor's global shape and where its pieces lie
    dcp/__<rank>_0.distcp     one file per rank of the saving run: its shards (save_sharded)
    config.json, tokenizer/   written by rank 0, as for any checkpoint
Inside dcp/ the state is {"model": model state dict (without lm_head.weight when the head is tied
to transformer.wte.weight: stored once, as in model.safetensors; an untied head is its own tensor),
"optimizer": the optimizer state keyed
by parameter names}, as torch.distributed.checkpoint.state_dict.get_state_dict gives them, so DCP
reshards it on load: a checkpoint saved by N processes loads into M processes, or into a plain GPT
in one process without a process group. All ranks must write dcp/ on one file system that every
rank (and `consolidate`) can read, as DCP's FileSystemWriter requires.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .. import atomic
from .. import checkpoint as ckpt
from ..console import count
from ..errors import CheckpointError, OutputExistsError
from ..model import GPT, GPTConfig

DCP_DIR = "dcp"
DCP_METADATA = ".metadata"  # the file DCP writes last, once every rank's shards are on disk
MODEL, OPTIMIZER = "model", "optimizer"  # the top-level keys of the state in dcp/
WTE_KEY = "transformer.wte.weight"
_SINGLE_PROCESS = ".*assuming the intent is to (save|load) in a single process"  # DCP's warning when no_dist


def _fsdp_api() -> tuple[Any, Any]:
    """(fully_shard, MixedPrecisionPolicy) from this torch: public in torch.distributed.fsdp since
    2.6, in torch.distributed._composable.fsdp before. Raises ImportError when neither exists."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def _backend_for(device: torch.device) -> str | None:
    """The name of the default process group's backend for device's type ("gloo", "nccl"), or None."""
    import torch.distributed as dist

    for entry in dist.get_backend_config().split(","):  # "cpu:gloo,cuda:nccl", or one name for all
        kind, _, name = entry.strip().rpartition(":")
        if not kind or kind == device.type:
            return name
    return None


def fsdp_unavailable(device: torch.device | str) -> str | None:
    """None when FSDP2 can run here: this torch has fully_shard, a process group is initialized,
    and its backend suits `device` (gloo for "cpu", nccl for "cuda"); otherwise one sentence why,
    for the user. Reads state only: no collective, so ranks may call it at any time."""
    device = torch.device(device)
    import torch.distributed as dist

    if not dist.is_available():
        return "this torch build has no torch.distributed, which FSDP2 needs"
    try:
        _fsdp_api()
    except ImportError:
        return f"this torch ({torch.__version__}) has no FSDP2 (torch.distributed.fsdp.fully_shard); install torch >= 2.6"
    if not dist.is_initialized():
        return "FSDP2 needs a process group: start the run with torchrun (torchrun --nproc_per_node N -m simplegpt train ...)"
    backend = _backend_for(device)
    wanted = {"cpu": "gloo", "cuda": "nccl"}.get(device.type)
    if wanted is None:
        return f"simplegpt runs FSDP2 on cpu (gloo) or cuda (nccl), not on {device.type}"
    if backend != wanted:
        have = f"the process group's backend for {device.type} is {backend}" if backend else \
            f"the process group has no backend for {device.type}"
        return f"FSDP2 on {device.type} needs the {wanted} backend, but {have}"
    return None


def shard_model(model: GPT, mp_policy: Any = None) -> GPT:
    """Apply FSDP2 to `model` in place and return it: fully_shard on each transformer block, then on
    the root (which holds the embeddings, the final norm and the head, tied or not), over a 1-D mesh of
    all ranks on the device the model's parameters are on (move the model there first; on CUDA, after
    torch.cuda.set_device(local_rank)). Parameters become DTensors sharded on dim 0; the model's class
    becomes FSDP2's subclass of it, so forward, loss and state_dict keys are the plain model's.
    Compile after sharding, not before. Gradient accumulation: model.set_requires_gradient_sync(False)
    on the micro-steps before the last (FSDP2's no_sync).

    mp_policy: None (parameters, compute and gradients in the model's dtype), a dtype such as
    torch.bfloat16 (parameters cast to it for compute, gradients reduced in float32), or a
    torch.distributed.fsdp.MixedPrecisionPolicy. The sharded parameters, and so the optimizer and
    checkpoints, stay in the model's dtype.

    Raises RuntimeError when fully_shard cannot run here (see fsdp_unavailable) or a tied
    lm_head/wte weight came out as two tensors (a bug)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard, MixedPrecisionPolicy = _fsdp_api()
    device = next(model.parameters()).device
    if (why := fsdp_unavailable(device)) is not None:
        raise RuntimeError(why)
    if isinstance(mp_policy, torch.dtype):
        mp_policy = MixedPrecisionPolicy(param_dtype=mp_policy, reduce_dtype=torch.float32)
    kwargs: dict[str, Any] = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),))}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in model.transformer.h:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    if _tied(model) and model.lm_head.weight is not model.transformer.wte.weight:
        raise RuntimeError("fully_shard untied lm_head.weight from transformer.wte.weight")
    return model


def _tied(model: nn.Module) -> bool:
    """Whether the model's output head is its token embedding (GPTConfig.tie_word_embeddings)."""
    return getattr(model, "_orig_mod", model).config.tie_word_embeddings


def is_sharded_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` (its newest complete copy, see simplegpt.atomic) holds a sharded
    checkpoint: dcp/ with DCP's .metadata, which it writes last."""
    folder = atomic.newest_complete(directory)
    return folder is not None and (folder / DCP_DIR / DCP_METADATA).is_file()


def save_sharded(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Collective: every rank writes its shards of the model's and the optimizer's state into
    directory/dcp (torch.distributed.checkpoint.save with get_state_dict; files fsynced by DCP, the
    folder here). Writes nothing else: the caller (rank 0) writes config.json and the rest, and makes
    the whole directory appear atomically. `model` is a sharded model (shard_model) or, in a single
    process without a process group, a plain GPT. optimizer None saves the weights only (a best/).
    Raises OSError from the file system (DCP's CheckpointException when a rank's write failed)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    target = Path(directory) / DCP_DIR
    if optimizer is None:
        state = {MODEL: get_model_state_dict(model)}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {MODEL: model_state, OPTIMIZER: optim_state}
    if _tied(model):
        state[MODEL].pop(ckpt.TIED_KEY, None)  # it is transformer.wte.weight: stored once
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS)  # no_dist says so already
        dcp.save(state, storage_writer=dcp.FileSystemWriter(target, sync_files=True), no_dist=not dist.is_initialized())
    atomic._fsync_dir(target)


def load_sharded(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a sharded checkpoint's weights (and, unless optimizer is None, its optimizer state) into
    `model` and `optimizer` in place: a sharded model on any number of ranks (collective; DCP reads
    each rank's part, whatever world size saved it), or a plain GPT in one process without a process
    group. The optimizer must have the parameter groups of the one that was saved (its hyper-parameters
    come from the checkpoint). Files whose sha256 config.json records are checked first.
    Raises CheckpointError when `directory` is not a sharded checkpoint, a file is corrupted, or the
    checkpoint does not match the model (names, shapes) or holds no optimizer state."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    folder = _sharded_folder(directory)
    _verify_shards(folder)
    if optimizer is None:
        state = {MODEL: get_model_state_dict(model)}
    else:
        from .dcp_safe import read_metadata

        saved = read_metadata(folder / DCP_DIR).state_dict_metadata
        if not any(key.startswith(f"{OPTIMIZER}.") for key in saved):
            raise CheckpointError(f"{directory} holds weights only, no optimizer state: it cannot be resumed exactly")
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {MODEL: model_state, OPTIMIZER: optim_state}
    tied = _tied(model)
    if tied:
        state[MODEL].pop(ckpt.TIED_KEY, None)
    _dcp_load(state, folder, no_dist=not dist.is_initialized())
    if tied:
        state[MODEL][ckpt.TIED_KEY] = state[MODEL][WTE_KEY]
    if optimizer is None:
        set_model_state_dict(model, state[MODEL])
    else:
        set_state_dict(model, optimizer, model_state_dict=state[MODEL], optim_state_dict=state[OPTIMIZER])


def consolidate(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False,
                progress: Callable[[str], None] | None = None) -> Path:
    """Read the sharded checkpoint `src` in this process (no process group needed; DCP gathers every
    rank's shards) and write `dst` as the usual checkpoint directory: model.safetensors, config.json
    (src's model config and metadata: step, metrics, ...), tokenizer/ — what load_checkpoint, and so
    generate, serve, eval and export-hf, read. Written atomically (a temporary sibling renamed in).
    No train_state.pt: a sharded checkpoint resumes as it is, on any world size (load_sharded).
    Raises CheckpointError when src is not a readable sharded checkpoint, OutputExistsError when dst
    exists and overwrite is False, OSError from the file system. progress, when given, is called
    once the checks passed, with a line saying what is being read. Returns dst."""
    from ..tokenizer import load_tokenizer
    from .dcp_safe import read_metadata

    src, dst = Path(src), Path(dst)
    folder = _sharded_folder(src)
    if atomic.newest_complete(dst) is not None and not overwrite:
        raise OutputExistsError(f"{dst} already exists; choose another destination or pass --overwrite")
    if dst.resolve() == src.resolve() or dst.resolve().is_relative_to(folder.resolve()):
        raise OutputExistsError(f"{dst} is {src} or inside it; choose a destination beside it")

    def read(folder: Path) -> tuple[GPT, Any, dict[str, Any]]:
        doc = ckpt.read_checkpoint_config(folder)
        try:
            config = GPTConfig.from_dict(doc["model"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{folder / ckpt.CONFIG_FILE} holds an invalid model config: {e}") from None
        _verify_shards(folder, doc)
        saved = read_metadata(folder / DCP_DIR).state_dict_metadata  # the shapes, checked before a model is built
        ckpt.check_config_fits(config, {k.removeprefix(f"{MODEL}."): tuple(v.size) for k, v in saved.items()
                                        if k.startswith(f"{MODEL}.") and hasattr(v, "size")},
                               str(folder / ckpt.CONFIG_FILE))
        if progress is not None:
            shards = sorted((folder / DCP_DIR).glob("*.distcp"))
            progress(f"consolidating {src}: {count(config.n_layer, 'layer')}, {config.n_embd} wide, from "
                     f"{count(len(shards), 'shard file')} ({sum(f.stat().st_size for f in shards) / 2**20:.1f} MiB)")
        with torch.device("meta"):
            shapes = GPT(config).state_dict()
        weights = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in shapes.items()
                   if not (config.tie_word_embeddings and k == ckpt.TIED_KEY)}
        _dcp_load({MODEL: weights}, folder, no_dist=True)
        model = ckpt.model_from_state(config, weights)
        try:
            tokenizer = load_tokenizer(folder / ckpt.TOKENIZER_DIR) if (folder / ckpt.TOKENIZER_DIR).is_dir() else None
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{folder / ckpt.TOKENIZER_DIR} is damaged ({e}); use another checkpoint") from None
        return model, tokenizer, doc

    # all from one copy of src, should a run save it meanwhile (simplegpt.checkpoint.read_whole)
    model, tokenizer, doc = ckpt.read_whole(src, read)
    metadata = {k: v for k, v in doc.items() if k not in ckpt.NOT_METADATA}
    return ckpt.save_checkpoint(dst, model, tokenizer, metadata=metadata)


def _sharded_folder(directory: str | os.PathLike) -> Path:
    """The newest complete copy of a sharded checkpoint; CheckpointError naming what it is instead."""
    directory = Path(directory)
    folder = atomic.newest_complete(directory)
    if folder is None:
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if not (folder / DCP_DIR / DCP_METADATA).is_file():
        if (folder / ckpt.WEIGHTS_FILE).is_file():
            what = f"it is a single-process checkpoint ({ckpt.WEIGHTS_FILE}), usable as it is"
        elif (folder / "last").is_dir():
            what = f"it looks like a run folder; name its checkpoint: {directory / 'last'}"
        else:
            what = f"it has no {DCP_DIR}/{DCP_METADATA}"
        raise CheckpointError(f"{directory} is not a sharded (FSDP2) checkpoint: {what}")
    return folder


def _verify_shards(folder: Path, doc: dict[str, Any] | None = None) -> None:
    """Check the files of dcp/ and tokenizer/ against the sha256 digests config.json records, when
    it records them (a checkpoint whose writer recorded none loads unchecked)."""
    if doc is None:
        if not (folder / ckpt.CONFIG_FILE).is_file():
            return
        doc = ckpt.read_checkpoint_config(folder)
    names = [n for n in doc.get(ckpt.CHECKSUMS, {}) if n.startswith((f"{DCP_DIR}/", f"{ckpt.TOKENIZER_DIR}/"))]
    ckpt.verify_files(folder, doc, names)


def _dcp_load(state: dict[str, Any], folder: Path, no_dist: bool) -> None:
    """dcp.load of folder/dcp into `state` in place; a checkpoint that does not match the state
    (names, shapes, a missing optimizer state) or cannot be read is a CheckpointError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from .dcp_safe import SafeLoadPlanner, SafeReader, read_metadata

    read_metadata(folder / DCP_DIR)  # a refused or damaged .metadata is named before DCP starts
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS)
        try:
            # DCP's own reader and planner would unpickle .metadata and the non-tensor values unrestricted
            dcp.load(state, storage_reader=SafeReader(folder / DCP_DIR), planner=SafeLoadPlanner(), no_dist=no_dist)
        except (CheckpointException, RuntimeError, ValueError, KeyError) as e:
            if isinstance(cause := _first_exception(e), CheckpointError):
                raise cause from None
            raise CheckpointError(f"{folder / DCP_DIR} cannot be loaded into this model: {_first_failure(e)}") from None


def _first_exception(e: BaseException) -> BaseException:
    """The first rank's exception of DCP's CheckpointException, or e itself."""
    failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, its stack)}
    if failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return e


def _first_failure(e: BaseException) -> str:
    """The first line that says what went wrong, from DCP's per-rank failures or a plain error."""
    e = _first_exception(e)
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__
