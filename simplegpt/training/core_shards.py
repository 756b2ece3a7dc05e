"""Data parallelism over CPU cores inside one process, for training small models on a CPU.

PyTorch splits each op of a step over its threads (intra-op parallelism). For a small model every
op is small, and every op ends at a barrier where the threads wait for each other: on a 2-core
machine two threads make a step only ~1.3x faster than one, and where another process holds a
core the barriers make it several times slower. `CoreShards` instead gives each thread a share
of the batch and runs the whole forward and backward of that share on one core, through a replica
of the model that shares the model's weights (no copies, so the optimizer's update reaches every
replica) but has its own gradients; the replicas' gradients are then added to the model's in a
fixed order. The step is the same function of the batch (the loss weights each share by its
count of target tokens), and the same bits run to run for a given shard count.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

import torch
import torch.nn as nn

from ..model import IGNORE_INDEX

T = TypeVar("T")


class CoreShards:
    """Forward + backward of a batch split over `shards` threads, one torch thread each (the caller
    sets torch.set_num_threads(1) for the steps it runs through this)."""

    def __init__(self, model: nn.Module, shards: int, loss: Callable[..., torch.Tensor] | None = None):
        """loss(module, x, y, attention_mask) -> the mean loss of a share (default: the module's own loss())."""
        if shards < 2:
            raise ValueError(f"CoreShards needs at least 2 shards, got {shards}")
        self.model = model
        self.loss = loss or (lambda module, x, y, mask: module.loss(x, y, attention_mask=mask))
        self.replicas = [model] + [_replica(model) for _ in range(shards - 1)]
        # The parameter lists, once: walking the module tree costs ~1 ms per step at these sizes
        self.params = list(model.parameters())
        self.replica_params = [list(r.parameters()) for r in self.replicas[1:]]
        self.pool = ThreadPoolExecutor(shards - 1, thread_name_prefix="simplegpt-shard")
        self._share_weights()

    def _share_weights(self) -> None:
        for params in self.replica_params:
            for p, q in zip(self.params, params):
                q.data = p.data  # the same storage: updates to the model's weights are the replica's

    def forward_backward(self, batch: tuple[torch.Tensor, ...], scale: float = 1.0) -> float:
        """Mean loss of the batch (x, y[, attention_mask]); gradients of scale * loss are added to
        the model's .grad, as `(scale * loss).backward()` on the whole batch would. A batch with no
        target tokens adds nothing and its loss is 0."""
        self._share_weights()  # again each step: code that gave a weight new storage is followed
        parts = [torch.tensor_split(t, len(self.replicas)) for t in batch]
        shares = [tuple(p[i] for p in parts) for i in range(len(self.replicas))]
        counts = [int((s[1] != IGNORE_INDEX).sum()) for s in shares]
        total = sum(counts)
        if total == 0:
            return 0.0  # a mean over no tokens would be NaN

        def run(i: int) -> torch.Tensor:
            if i:
                torch.set_num_threads(1)  # a worker thread's own OpenMP setting
            x, y, *mask = shares[i]
            loss = self.loss(self.replicas[i], x, y, mask[0] if mask else None)
            weight = counts[i] / total
            (loss * (weight * scale)).backward()
            return loss.detach() * weight

        jobs = [self.pool.submit(run, i) for i in range(1, len(shares)) if counts[i]]
        losses = [run(0)] if counts[0] else []
        losses += [job.result() for job in jobs]
        for params in self.replica_params:
            into, adds = [], []
            for p, q in zip(self.params, params):
                if q.grad is None:
                    continue
                if p.grad is None:
                    p.grad = q.grad
                else:
                    into.append(p.grad)
                    adds.append(q.grad)
                q.grad = None
            if into:
                torch._foreach_add_(into, adds)  # one call for all tensors: per-tensor adds cost ~0.4 ms a step
        return float(sum(losses))

    def beside(self, fn: Callable[[], T]) -> Future[T]:
        """fn() on a worker thread, with one torch thread (as the shares run), while the caller goes on."""

        def run() -> T:
            torch.set_num_threads(1)  # the worker's own OpenMP setting: one core each, as in the steps
            return fn()

        return self.pool.submit(run)

    def close(self) -> None:
        self.pool.shutdown()


def _replica(model: nn.Module) -> nn.Module:
    """A deep copy of model whose parameters are new ones over the model's own weights (as
    Parameter.__deepcopy__ makes them, without the copy of the data: a copy of every weight, replaced
    at once by the shared one, cost ~10x more of the run's start)."""
    memo = {id(p): type(p)(p.data, p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)
