"""What the ways of running over torchrun's processes share (DDP, FSDP2): the process group's
collectives (simplegpt.training.distributed), the global-batch rule, and the checkpoint that rank 0
writes with every rank's random state in it (docs/distributed.md).

The micro-batches of a step are defined globally (every rank draws the same sampler with the same
seed) and rank r computes micro-batches r, r + N, r + 2N, ... of them (N = the world size, which must
divide grad_accum_steps). Each rank scales a micro-batch's mean loss by N x its share of the step's
loss tokens (every rank draws every micro-batch, so every rank knows the step's count), and the
gradient all-reduce averages over the N ranks, so the gradient is the one a single process
accumulates over the same global batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager, TypeVar

import torch
import torch.nn as nn

from ... import checkpoint as ckpt
from ...config import TrainConfig
from ...errors import ConfigError
from ...model import GPT
from ...tokenizer import Tokenizer
from .. import distributed
from ..evaluation import eval_sum
from ..lora import checkpoint_writer
from ..start import rng_state
from .single import Single

T = TypeVar("T")


class LossOf(nn.Module):
    """The training loss as a module's forward, for the wrappers whose forward call is what arms their
    gradient all-reduce (DDP): forward(x, y, mask, empty) -> loss(model, x, y, mask, empty), a scalar."""

    def __init__(self, model: nn.Module, loss: Callable[..., torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                empty: bool = False) -> torch.Tensor:
        return self.loss(self.model, x, y, mask, empty=empty)


class Ranks(Single):
    """The processes of one torchrun launch; subclasses wrap the model and say how a micro-step
    synchronises gradients (`_gradient_sync`)."""

    launched, samples = True, True
    label = ""  # what the start line calls the way: "DDP", "FSDP2"
    collective_forward = False  # whether a forward pass is a collective (every rank must run as many)

    def __init__(self, d: distributed.Dist, threads: int) -> None:
        super().__init__(threads, d.device)
        self.d = d
        self.rank, self.world, self.is_main = d.rank, d.world_size, d.is_main
        self.runner: nn.Module | None = None  # what a micro-step calls: loss(x, y, mask, empty)

    def agree(self, fn: Callable[[], T], on_peer_failure: Callable[[], None] | None = None) -> T:
        try:
            return distributed.agree(self.d, fn)
        except distributed.PeerError:
            if on_peer_failure is not None:
                on_peer_failure()
            raise

    def agree_on(self, value: Any, message: str) -> None:
        if len(set(distributed.gather_objects(self.d, value))) > 1:
            raise distributed.PeerError(message, quiet=not self.is_main)

    def check(self, cfg: TrainConfig) -> None:
        distributed.check_accumulation(cfg.grad_accum_steps, self.world)
        if cfg.cpu_shards > 1:
            raise ConfigError("cpu_shards > 1 cannot run under torchrun: the ranks already split each step, "
                              "and CoreShards adds its replicas' gradients outside autograd, where DDP's "
                              "all-reduce never sees them; leave cpu_shards at 0")

    def _gradient_sync(self, last: bool) -> ContextManager[None]:
        """The context of a micro-step: gradients are all-reduced at the end of the rank's last one only."""
        raise NotImplementedError

    def forward_backward(self, batches: list[tuple], weights: list[float]) -> float:
        compute, loss_sum = self.compute, 0.0
        with distributed.collectives(self.d):  # a peer lost in the gradient all-reduce: one line
            for i in range(self.rank, len(batches), self.world):
                weight = weights[i]
                with self._gradient_sync(last=i + self.world >= len(batches)):
                    x, y, *mask = (t.to(compute.device, non_blocking=True) for t in batches[i])
                    with compute.autocast:
                        loss = self.runner(x, y, mask[0] if mask else None, weight == 0)
                    loss_sum += float(loss.detach()) * weight
                    # The all-reduce averages the gradients over the N ranks: N x weight makes it the weighted sum.
                    compute.scaler.scale(loss * (self.world * weight)).backward()
        return loss_sum

    def step_over_ranks(self, loss: float, received: str | None) -> tuple[float, str | None]:
        loss, sigint, sigterm = distributed.all_reduce_sum(
            self.d, [loss, received == "SIGINT", received == "SIGTERM"], self.compute.device)
        return loss, "SIGINT" if sigint else "SIGTERM" if sigterm else None

    def stop_now(self, received: str | None) -> str | None:
        return None  # the ranks agree on a signal at the next step

    def evaluate(self, make_sampler: Callable[[], Any], iters: int) -> float:
        # each rank evaluates its share of the same eval_iters batches
        total, tokens = eval_sum(self.module, make_sampler, iters, self.compute, self.rank, self.world,
                                 same_count=self.collective_forward)
        total, tokens = distributed.all_reduce_sum(self.d, [total, tokens], self.compute.device)
        return total / tokens

    def _train_state(self, train_state: dict[str, Any] | None, optimizer: Any) -> dict[str, Any] | None:
        """train_state with every rank's RNG state (a collective) and the optimizer's state."""
        if train_state is None:
            return None
        rngs = distributed.gather_objects(self.d, rng_state())
        return {**train_state, "optimizer": self._optimizer_state(optimizer), "rng_ranks": rngs}

    def _optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return optimizer.state_dict()

    def save(self, path: Path, model: GPT, tokenizer: Tokenizer, metadata: dict[str, Any],
             train_state: dict[str, Any] | None, optimizer: Any) -> Path | None:
        train_state = self._train_state(train_state, optimizer)
        if not self.is_main:
            return None  # rank 0 alone writes the run folder
        return ckpt.save_checkpoint(path, model, tokenizer, metadata=metadata, train_state=train_state,
                                    write_weights=checkpoint_writer(model))  # a LoRA model's: merged, and lora/

    def barrier(self) -> None:
        distributed.barrier(self.d)

    def describe(self, cfg: TrainConfig) -> str:
        processes = f"{self.world} process{'es' if self.world != 1 else ''}"
        return (f" per process; {processes} ({self.label} over {self.d.backend}, {cfg.grad_accum_steps // self.world} "
                f"of the {cfg.grad_accum_steps} micro-batches of a step each)")

    def peak_basis(self, basis: str) -> str:
        return f"{basis} x {self.world} process{'es' if self.world != 1 else ''}"

    def notes(self, cfg: TrainConfig) -> list[str]:
        return []

    def close(self) -> None:
        self.d.close()
