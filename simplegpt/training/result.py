"""What train() returns, and the result of a run that had already finished (read from its last/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint as ckpt
from ..config import TrainConfig
from . import run_dir
from .run_dir import LAST


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    tokens_seen: int
    elapsed_s: float
    val_loss: float | None = None
    val_bpb: float | None = None
    best_val_loss: float | None = None
    interrupted: str | None = None  # "SIGINT" / "SIGTERM" / "stop_at" when the run stopped early
    already_finished: bool = False  # the run had done its max_iters before: nothing was trained
    losses: list[float] = field(default_factory=list)

    @property
    def last_checkpoint(self) -> Path:
        return self.out_dir / LAST


def finished_run(out: Path, cfg: TrainConfig) -> Path | None:
    """out's last/ when out holds this very run (the same config) and it has done its max_iters (or time budget)."""
    return out / LAST if run_dir.holds_config(out, cfg) and run_dir.is_finished(out / LAST, cfg) else None


def finished_result(last: Path) -> TrainResult:
    """The TrainResult of a finished run, read from its last/ checkpoint (nothing is trained)."""
    doc = ckpt.read_checkpoint_config(last)
    found = doc.get("metrics") if isinstance(doc.get("metrics"), dict) else {}
    state = ckpt.load_train_state(last)
    return TrainResult(out_dir=last.parent, step=int(doc["step"]), tokens_seen=int(doc.get("tokens_seen", 0)),
                       elapsed_s=float(state.get("elapsed_s", 0.0)), val_loss=found.get("val_loss"),
                       val_bpb=found.get("val_bpb"), best_val_loss=found.get("best_val_loss"), already_finished=True)
