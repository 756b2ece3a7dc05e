"""One process, each batch split over CPU cores: each thread runs its share of a micro-batch through
the whole model on one core (simplegpt.training.core_shards.CoreShards), a replica sharing the
model's weights; the replicas' gradients are added in a fixed order. Losses are the one-process
run's to float rounding, and the same bits run to run for a shard count. A Muon step is split over
the cores too (training/muon.py), with the same results."""

from __future__ import annotations

from typing import Any

import torch

from ...config import TrainConfig
from ...model import GPT
from ..core_shards import CoreShards
from ..muon import MuonAdamW
from .base import Compute
from .single import Single


class CoreShardsWay(Single):
    """Single, with each micro-batch split `shards` ways over one-thread replicas."""

    name = "core_shards"

    def __init__(self, threads: int, device: torch.device, shards: int) -> None:
        super().__init__(threads, device)
        self.shards_count = shards
        self.shards: CoreShards | None = None

    def wrap(self, model: GPT, cfg: TrainConfig, compute: Compute) -> None:
        super().wrap(model, cfg, compute)  # train mode before CoreShards copies it
        self.shards = CoreShards(self.module, self.shards_count,
                                 loss=lambda module, x, y, mask: compute.loss(module, x, y, mask))

    def forward_backward(self, batches: list[tuple], weights: list[float]) -> float:
        # One core per share of the batch; the optimizer's step then runs on that thread count too, where a
        # second OpenMP thread would spin on the core the next step's other share needs (measured 15% slower).
        torch.set_num_threads(1)
        loss_sum = 0.0
        for batch, weight in zip(batches, weights):
            loss_sum += self.shards.forward_backward(batch, weight) * weight
        return loss_sum

    def clip_and_step(self, optimizer: Any, max_norm: float) -> float:
        # Muon's Newton-Schulz iterations are most of the step: half of the matrices on the worker's core
        if isinstance(optimizer, MuonAdamW):
            return optimizer.clip_and_step(max_norm, beside=self.shards.beside)
        return optimizer.clip_and_step(max_norm)

    def evaluate(self, make_sampler, iters: int) -> float:
        torch.set_num_threads(self.threads)
        return super().evaluate(make_sampler, iters)

    def describe(self, cfg: TrainConfig) -> str:
        return f" (each batch split {self.shards_count} ways)"

    def close(self) -> None:
        if self.shards is not None:
            self.shards.close()
        torch.set_num_threads(self.threads)
