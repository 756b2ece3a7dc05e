"""DDP: every rank holds the whole model and computes its share of each step's micro-batches;
DistributedDataParallel all-reduces the gradients in the backward pass of the rank's last
micro-batch (no_sync before it). Rank 0 writes plain checkpoints, which resume on any number of
processes, one included."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from ...config import TrainConfig
from ...model import GPT
from .. import distributed
from .base import Compute
from .ranks import LossOf, Ranks


class DDPWay(Ranks):
    name, label = "ddp", "DDP"

    def wrap(self, model: GPT, cfg: TrainConfig, compute: Compute) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        super().wrap(model, cfg, compute)
        # DDP over the kernels' view: the same Parameter objects, and their gradients pass through autograd's
        # AccumulateGrad (the kernels are autograd Functions), where DDP's all-reduce hooks sit.
        inner = model if cfg.compile else self.module
        try:
            self.ddp = DDP(LossOf(inner, compute.loss),
                           device_ids=[compute.device.index] if compute.device.type == "cuda" else None)
        except Exception as e:
            raise distributed.lost_peer(self.d, e) from None
        self.runner = torch.compile(self.ddp) if cfg.compile else self.ddp
        if cfg.compile:
            self.module = model  # evaluation: the plain model (the compiled module is DDP's)

    def _gradient_sync(self, last: bool) -> ContextManager[None]:
        return contextlib.nullcontext() if last else self.ddp.no_sync()
