"""The interface every way of running a training step implements, and the one-process defaults.

A way of running owns what differs between one process, CPU core shards, DDP and FSDP2: wrapping
the model, which micro-batches a rank computes and which of them synchronise gradients, summing
the step's loss and the evaluation over ranks, agreeing on errors and stops, and writing and
reading checkpoints (plain, or sharded). The loop (simplegpt.training.loop) calls these methods
only, the same way whatever runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

import torch
import torch.nn as nn

from ... import checkpoint as ckpt
from ...config import TrainConfig
from ...errors import CheckpointError
from ...model import GPT, GPTConfig
from ...tokenizer import Tokenizer
from ..loss import CrossEntropy

T = TypeVar("T")


@dataclass
class Compute:
    """How a step computes: the device, the autocast context (a null one in float32), the loss
    scaler (enabled in float16 only) and the loss object."""

    device: torch.device
    dtype: torch.dtype
    autocast: Any
    scaler: torch.amp.GradScaler
    loss: CrossEntropy


class WayOfRunning(Protocol):
    """One way of running the steps of a training run. rank/world: this process's place (0/1 in one
    process); is_main: it writes the run folder and prints; launched: under torchrun."""

    name: str
    rank: int
    world: int
    is_main: bool
    launched: bool
    threads: int  # torch's CPU threads for this process
    device: torch.device  # where this process computes
    samples: bool  # whether this process draws the evaluation samples

    def agree(self, fn: Callable[[], T], on_peer_failure: Callable[[], None] | None = None) -> T:
        """fn() on every rank; when it fails on one, every rank raises (only the failing one says why),
        the others after on_peer_failure()."""

    def agree_on(self, value: Any, message: str) -> None:
        """PeerError(message) on every rank unless every rank holds the same value (a collective)."""

    def check(self, cfg: TrainConfig) -> None:
        """ConfigError for settings this way cannot run."""

    def new_model(self, config: GPTConfig, device: torch.device) -> GPT:
        """A randomly initialized model of config on device."""

    def load_resume(self, path: Path, cfg: TrainConfig, device: torch.device) -> tuple[GPT, Tokenizer, dict]:
        """The model, tokenizer and train state of the checkpoint at path, as this way resumes it."""

    def wrap(self, model: GPT, cfg: TrainConfig, compute: Compute) -> None:
        """Prepare model for the steps (compile, kernels, DDP, sharding); kept for the other methods."""

    def optimizer_config(self, cfg: TrainConfig) -> TrainConfig:
        """cfg as the optimizer factory must see it on this way (ConfigError for an optimizer it cannot run)."""

    def restore_optimizer(self, path: Path, model: GPT, optimizer: Any, state: dict[str, Any]) -> None:
        """Load the optimizer's state (a sharded checkpoint: the weights too) from the checkpoint at path."""

    def forward_backward(self, batches: list[tuple], weights: list[float]) -> float:
        """Forward and backward of this rank's micro-batches of a step, each micro-batch's gradient
        weighed by weights[i] (its share of the step's loss tokens); gradients synchronised once,
        after the last. Returns this rank's part of the step's loss. A peer lost in a collective
        is one line (distributed.LostPeer)."""

    def clip_and_step(self, optimizer: Any, max_norm: float) -> float:
        """optimizer.clip_and_step(max_norm) as this way runs it (on its threads); the gradient norm."""

    def step_over_ranks(self, loss: float, received: str | None) -> tuple[float, str | None]:
        """The step's loss summed over the ranks, and the stop signal any rank received."""

    def stop_now(self, received: str | None) -> str | None:
        """A signal received during an evaluation that stops the run now (one process), or None
        (several: they agree on it at the next step)."""

    def evaluate(self, make_sampler: Callable[[], Any], iters: int) -> float:
        """The val loss over the same `iters` batches every time, summed over ranks; train mode after."""

    def save(self, path: Path, model: GPT, tokenizer: Tokenizer, metadata: dict[str, Any],
             train_state: dict[str, Any] | None, optimizer: Any) -> Path | None:
        """Write the checkpoint (rank 0 the folder; a collective where ranks hold parts of it).
        train_state None: weights only (a best/)."""

    def barrier(self) -> None:
        """Wait for every rank."""

    def describe(self, cfg: TrainConfig) -> str:
        """What the start line says of the way ('' for one plain process)."""

    def peak_basis(self, basis: str) -> str:
        """What the MFU line says the run's peak FLOP/s is, given one process's."""

    def notes(self, cfg: TrainConfig) -> list[str]:
        """Lines to log at the start about what this way does differently."""

    def resume_command(self) -> str:
        """The command that continues a stopped run of this way."""

    def close(self) -> None:
        """Free what the way holds (threads, the process group it joined)."""


def micro_loss(module: nn.Module, batch: tuple, weight: float, compute: Compute) -> torch.Tensor:
    """The mean loss of one micro-batch (x, y[, attention_mask]) on module, moved to the device."""
    x, y, *mask = (t.to(compute.device, non_blocking=True) for t in batch)
    with compute.autocast:
        return compute.loss(module, x, y, mask[0] if mask else None, empty=weight == 0)


def restore_part(name: str, target: Any, state: dict[str, Any], path: Path) -> None:
    """target.load_state_dict(state[name]); CheckpointError naming the file for a state that does not fit
    (load_train_state checked its fields, not everything they hold)."""
    try:
        target.load_state_dict(state[name])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path / ckpt.TRAIN_STATE_FILE} is damaged: its {name} state cannot be restored "
                              f"({detail}); use another checkpoint") from None
