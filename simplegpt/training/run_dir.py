"""The run folder: what a training run writes and the rules that keep it from overwriting another.

    out_dir/config.toml     the effective config (loadable with --config)
    out_dir/metrics.jsonl   one record per logged step and per evaluation (and TensorBoard in tb/)
    out_dir/samples.txt     the samples of every evaluation
    out_dir/last/           the latest checkpoint, with the full train state for --resume
    out_dir/best/           the checkpoint with the lowest val loss
    out_dir/loss.png        the loss curve, drawn at the end
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from ..config import TrainConfig, read_toml, to_toml
from ..errors import CheckpointError, ConfigError
from . import TrainingError

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.txt"
PLOT_FILE = "loss.png"
LAST, BEST = "last", "best"


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint a --resume path names: the path itself, or RUN/last for a run folder RUN."""
    path = Path(path)
    if (path / ckpt.CONFIG_FILE).is_file():
        return path
    with contextlib.suppress(OSError):  # a read-only folder: the loaders still find the newest complete copy
        ckpt.recover(path / LAST)  # a save of last/ that a crash interrupted is finished first
    return path / LAST if (path / LAST).is_dir() else path


def check_out_dir(out: Path, cfg: TrainConfig, overwrite: bool, resuming: bool) -> None:
    """Refuse a folder that holds another run or other files (ConfigError naming the way out); make it
    and check that it is writable."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (resuming or overwrite):
        saved = out / CONFIG_FILE
        if not saved.is_file():
            raise ConfigError(f"out_dir {out} is not empty and holds no simplegpt run; choose another out_dir "
                              "or pass --overwrite")
        try:
            same = read_toml(saved) == cfg.to_dict()
        except ConfigError:
            same = False
        if not same:
            raise ConfigError(f"out_dir {out} already holds a different run; pass --overwrite to replace it, "
                              f"--resume {out / LAST} to continue it, or choose another out_dir")
        step = checkpoint_step(out / LAST)
        if step is not None and step < cfg.max_iters:
            raise ConfigError(f"out_dir {out} holds this run stopped at step {step}/{cfg.max_iters}; continue it "
                              f"with --resume {out / LAST}, or pass --overwrite to start again")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to out_dir {out} ({e.strerror or e}); choose a writable out_dir") from None


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint was saved at; None when there is none or it cannot be read."""
    try:
        return int(ckpt.read_checkpoint_config(path).get("step"))
    except (CheckpointError, TypeError, ValueError):
        return None


def check_disk_space(out: Path, num_parameters: int) -> None:
    """TrainingError when out's disk cannot hold the run's checkpoints (float32 weights)."""
    # last/ holds weights + 2 AdamW moments, best/ the weights; during a save one more copy exists.
    need = num_parameters * 4 * (3 + 1 + 3) + (16 << 20)
    free = shutil.disk_usage(out).free
    if free < need:
        raise TrainingError(f"not enough disk space in {out}: checkpoints need ~{need / 2**20:.0f} MiB, "
                            f"{free / 2**20:.0f} MiB free; free some space or choose another out_dir")


def write_config(out: Path, cfg: TrainConfig) -> None:
    (out / CONFIG_FILE).write_text(to_toml(cfg), encoding="utf-8")


def append_sample(out: Path, step: int, val_loss: float, sample: str) -> None:
    with open(out / SAMPLES_FILE, "a", encoding="utf-8") as f:
        f.write(f"=== step {step}, val loss {val_loss:.4f} ===\n{sample}\n\n")


class Metrics:
    """metrics.jsonl (always) and TensorBoard (when installed and asked for)."""

    def __init__(self, out: Path, keep_until: int | None, tensorboard: bool):
        self.path = out / METRICS_FILE
        if keep_until is None:
            self.path.write_text("")
        elif self.path.exists():
            # resuming at step k: records after k belong to the lost future of the interrupted run
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= keep_until]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:
                pass

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_losses(out: Path) -> Path | None:
    """loss.png from metrics.jsonl; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [json.loads(ln) for ln in (out / METRICS_FILE).read_text().splitlines() if ln.strip()]
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    path = out / PLOT_FILE
    tmp = out / ".loss.tmp.png"
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path
