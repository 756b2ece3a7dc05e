"""FSDP2: parameters, gradients and optimizer state sharded over the ranks (fully_shard per block,
then the root; simplegpt.training.fsdp). Each rank computes its share of each step's micro-batches;
the gradients are reduce-scattered after the rank's last one (set_requires_gradient_sync before it).
Checkpoints are sharded (dcp/, every rank writing its part into rank 0's folder) and resume on any
number of processes under torchrun; `simplegpt consolidate` makes a plain one. No samples: a forward
pass of the sharded model needs every rank."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ContextManager

import torch

from ... import checkpoint as ckpt
from ...config import TrainConfig
from ...errors import CheckpointError, ConfigError
from ...model import GPT, GPTConfig
from ...tokenizer import Tokenizer
from .. import distributed, fsdp
from ..start import check_resume_compatible
from .base import Compute
from .ranks import LossOf, Ranks


class FSDP2Way(Ranks):
    name, label = "fsdp", "FSDP2"
    samples, collective_forward = False, True  # a forward pass of the sharded model gathers every rank's shards

    def __init__(self, d: distributed.Dist, threads: int, seed: int) -> None:
        super().__init__(d, threads)
        self.seed = seed

    def check(self, cfg: TrainConfig) -> None:
        super().check(cfg)
        if (why := fsdp.fsdp_unavailable(self.d.device)) is not None:
            raise ConfigError(f"parallel = 'fsdp' cannot run here: {why}; use parallel = 'ddp'")
        if cfg.optimizer == "muon":
            raise ConfigError("optimizer = 'muon' cannot run with parallel = 'fsdp': Muon orthogonalizes each whole "
                              "weight matrix, and FSDP2 gives every rank only a slice of its rows; use parallel = "
                              "'ddp' or optimizer = 'adamw'")

    def new_model(self, config: GPTConfig, device: torch.device) -> GPT:
        torch.manual_seed(self.seed)  # every rank the same weights: fully_shard keeps each rank's own
        return super().new_model(config, device)

    def load_resume(self, path: Path, cfg: TrainConfig, device: torch.device) -> tuple[GPT, Tokenizer, dict]:
        """A model of the sharded checkpoint's config (its weights come in restore_optimizer, once it
        is sharded), its tokenizer and train state."""
        from ...tokenizer import load_tokenizer

        if not fsdp.is_sharded_checkpoint(path):
            raise ConfigError(f"{path} is a single-process (DDP) checkpoint: resume it with parallel = 'ddp'; "
                              "parallel = 'fsdp' resumes sharded checkpoints (any number of processes)")
        info = ckpt.describe_checkpoint(path)  # its config checked against the shapes in dcp/.metadata
        check_resume_compatible(info.metadata.get("train_config", {}), cfg, path)
        try:
            tokenizer = load_tokenizer(path / ckpt.TOKENIZER_DIR)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path} has no readable tokenizer ({e}); it cannot be resumed") from None
        return GPT(info.config).to(device), tokenizer, ckpt.load_train_state(path)

    def wrap(self, model: GPT, cfg: TrainConfig, compute: Compute) -> None:
        self.model, self.compute = model, compute
        fsdp.shard_model(model, mp_policy=compute.dtype if compute.dtype != torch.float32 else None)
        # compiled after sharding; no CPU kernels (they take no DTensors); FSDP2's hooks do the collectives
        self.module = torch.compile(model) if cfg.compile else model
        self.module.train()
        self.runner = LossOf(self.module, compute.loss)

    def optimizer_config(self, cfg: TrainConfig) -> TrainConfig:
        # PyTorch's AdamW: the CPU kernels' one reads parameters as plain tensors, and crashed on DTensors
        return cfg.replace(fused=cfg.fused and self.d.device.type != "cpu")

    def restore_optimizer(self, path: Path, model: GPT, optimizer: Any, state: dict[str, Any]) -> None:
        try:  # collective: each rank reads its part of the weights and optimizer, whatever world size saved it
            fsdp.load_sharded(path, model, optimizer)
        except CheckpointError:
            raise
        except Exception as e:
            raise distributed.lost_peer(self.d, e) from None

    def _gradient_sync(self, last: bool) -> ContextManager[None]:
        self.model.set_requires_gradient_sync(last)  # FSDP2's no_sync
        return contextlib.nullcontext()

    def _optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        # in dcp/, each rank's part (the field is kept, empty, for the readers that check a train state's fields)
        return {"state": {}, "param_groups": [], "in": fsdp.DCP_DIR}

    def save(self, path: Path, model: GPT, tokenizer: Tokenizer, metadata: dict[str, Any],
             train_state: dict[str, Any] | None, optimizer: Any) -> Path | None:
        opt = optimizer if train_state is not None else None
        train_state = self._train_state(train_state, optimizer)
        if not self.is_main:  # into rank 0's temporary directory, before its atomic swap
            fsdp.save_sharded(distributed.broadcast_object(self.d, None), model, opt)
            return None

        def write_sharded(tmp: Path) -> None:
            distributed.broadcast_object(self.d, tmp)
            fsdp.save_sharded(tmp, model, opt)

        return ckpt.save_checkpoint(path, model, tokenizer, metadata=metadata, train_state=train_state,
                                    write_weights=write_sharded)

    def notes(self, cfg: TrainConfig) -> list[str]:
        if cfg.sample_tokens:
            return ["samples: not drawn under FSDP2 (a forward pass of the sharded model needs every rank); "
                    "consolidate a checkpoint and use simplegpt generate"]
        return []

    def resume_command(self) -> str:
        return f"torchrun --nproc_per_node {self.world} -m simplegpt train"
