"""One process: the steps run the model (compiled, or through the CPU training kernels) on all of
torch's threads; the checkpoints are plain (model.safetensors + train_state.pt)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.nn as nn

from ... import checkpoint as ckpt
from ...config import TrainConfig
from ...errors import ConfigError
from ...model import GPT, GPTConfig
from ...tokenizer import Tokenizer
from ..evaluation import eval_sum
from ..lora import checkpoint_writer
from .base import Compute, micro_loss, restore_part

T = TypeVar("T")


class Single:
    """One process, torch's threads splitting every op: no ranks, nothing to agree on, plain checkpoints.
    The other ways start from it and change what they do differently."""

    name = "single"
    rank, world, is_main, launched, samples = 0, 1, True, False, True

    def __init__(self, threads: int, device: torch.device) -> None:
        self.threads, self.device = threads, device
        self.model: GPT | None = None
        self.module: nn.Module | None = None  # what the steps and evaluations run
        self.compute: Compute | None = None

    def agree(self, fn: Callable[[], T], on_peer_failure: Callable[[], None] | None = None) -> T:
        return fn()

    def agree_on(self, value: Any, message: str) -> None:
        pass

    def check(self, cfg: TrainConfig) -> None:
        pass

    def new_model(self, config: GPTConfig, device: torch.device) -> GPT:
        return GPT(config).to(device)

    def load_resume(self, path: Path, cfg: TrainConfig, device: torch.device) -> tuple[GPT, Tokenizer, dict]:
        from ..fsdp import is_sharded_checkpoint
        from ..start import load_resume

        if is_sharded_checkpoint(path):
            raise ConfigError(f"{path} is a sharded (FSDP2) checkpoint: resume it under torchrun with --parallel "
                              f"fsdp (any number of processes, 1 included: torchrun --nproc_per_node 1 -m "
                              f"simplegpt train --resume {path} --parallel fsdp); 'simplegpt consolidate {path}' "
                              "makes a single-process checkpoint of its weights")
        return load_resume(path, cfg, device)

    def wrap(self, model: GPT, cfg: TrainConfig, compute: Compute) -> None:
        from ...accel import cpu

        self.model, self.compute = model, compute
        # compiled, or with the CPU training kernels on modules sharing the parameters
        self.module = torch.compile(model) if cfg.compile else cpu.for_training(model)
        self.module.train()

    def optimizer_config(self, cfg: TrainConfig) -> TrainConfig:
        return cfg

    def restore_optimizer(self, path: Path, model: GPT, optimizer: Any, state: dict[str, Any]) -> None:
        restore_part("optimizer", optimizer, state, path)

    def forward_backward(self, batches: list[tuple], weights: list[float]) -> float:
        loss_sum = 0.0
        for batch, weight in zip(batches, weights):
            loss = micro_loss(self.module, batch, weight, self.compute)
            loss_sum += float(loss.detach()) * weight
            self.compute.scaler.scale(loss * weight).backward()
        return loss_sum

    def clip_and_step(self, optimizer: Any, max_norm: float) -> float:
        return optimizer.clip_and_step(max_norm)

    def step_over_ranks(self, loss: float, received: str | None) -> tuple[float, str | None]:
        return loss, received

    def stop_now(self, received: str | None) -> str | None:
        return received

    def evaluate(self, make_sampler: Callable[[], Any], iters: int) -> float:
        total, tokens = eval_sum(self.module, make_sampler, iters, self.compute)
        return total / tokens

    def save(self, path: Path, model: GPT, tokenizer: Tokenizer, metadata: dict[str, Any],
             train_state: dict[str, Any] | None, optimizer: Any) -> Path | None:
        if train_state is not None:
            train_state = {**train_state, "optimizer": optimizer.state_dict()}
        return ckpt.save_checkpoint(path, model, tokenizer, metadata=metadata, train_state=train_state,
                                    write_weights=checkpoint_writer(model))  # a LoRA model's: merged, and lora/

    def barrier(self) -> None:
        pass

    def describe(self, cfg: TrainConfig) -> str:
        return ""

    def peak_basis(self, basis: str) -> str:
        return basis

    def notes(self, cfg: TrainConfig) -> list[str]:
        if cfg.parallel == "fsdp":
            return ["note: parallel = 'fsdp' applies under torchrun (torchrun --nproc_per_node N -m simplegpt "
                    "train ...); this run is one process and saves a plain checkpoint"]
        return []

    def resume_command(self) -> str:
        return "simplegpt train"

    def close(self) -> None:
        pass
