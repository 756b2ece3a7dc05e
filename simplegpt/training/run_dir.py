"""The run folder: what a training run writes and the rules that keep it from overwriting another.

    out_dir/config.toml     the effective config (loadable with --config)
    out_dir/metrics.jsonl   one record per logged step and per evaluation (and TensorBoard in tb/)
    out_dir/samples.txt     the samples of every evaluation
    out_dir/last/           the latest checkpoint, with the full train state for --resume
    out_dir/best/           the checkpoint with the lowest val loss
    out_dir/loss.png        the loss curve, drawn at the end
    out_dir/.lock           held by the trainer writing the folder (see lock.py)

A run folder that cannot be written mid-run (a full disk, a quota, a file too large) stops the
run with one line naming its last good checkpoint (`write_failure`); the metrics written so far stay.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import atomic
from .. import checkpoint as ckpt
from ..config import TrainConfig, read_toml, to_toml
from ..errors import DISK_FULL, CheckpointError, ConfigError
from ..files import BEST, CONFIG_FILE, LAST, METRICS_FILE, PLOT_FILE, SAMPLES_FILE
from . import TrainingError
from .lock import LOCK_FILE, RunLock, lock_run_folder

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint a --resume path names: the path itself, or RUN/last for a run folder RUN
    (found as the loaders find it, at any point of an interrupted save). Raises CheckpointError for
    a run folder that has no last/ (a run stopped before its first save of it was complete)."""
    path = Path(path)
    if (path / ckpt.CONFIG_FILE).is_file():
        return path
    with contextlib.suppress(OSError):  # a read-only folder: the loaders still find the newest complete copy
        ckpt.recover(path / LAST)  # a save of last/ that a crash interrupted is finished first
    if atomic.newest_complete(path / LAST) is not None:
        return path / LAST
    best = atomic.newest_complete(path / BEST) is not None
    if (path / CONFIG_FILE).is_file() or best:  # a run folder (config.toml), not a checkpoint mid-swap
        also = f", or fine-tune its best weights in a new run with --init-from {path / BEST}" if best else ""
        raise CheckpointError(f"{path} is a run folder with no {LAST}/ checkpoint to resume: the run stopped before "
                              f"its first save of {LAST}/ was complete; start the run again without --resume{also}")
    return path


def check_out_dir(out: Path, cfg: TrainConfig, overwrite: bool, resuming: bool) -> RunLock:
    """Make `out` and take its lock (lock.py) before anything is written there, and return it.
    Raises RunFolderInUse when another trainer holds it, ConfigError for a folder that holds another
    run or other files (naming the way out) or that cannot be written; the lock is then let go."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} exists and is not a directory")
    if not (resuming or overwrite) and _other_files(out) and not (out / CONFIG_FILE).is_file():
        # checked before the lock file is made: it must not be left in a folder that is not a run's
        raise ConfigError(f"out_dir {out} is not empty and holds no simplegpt run; choose another out_dir "
                          "or pass --overwrite")
    created = missing_folders(out)
    try:
        lock = lock_run_folder(out)
    except OSError as e:
        raise ConfigError(f"cannot write to out_dir {out} ({e.strerror or e}); choose a writable out_dir") from None
    try:
        if not (resuming or overwrite) and _other_files(out):
            _check_same_run(out, cfg)
        _check_writable(out)
    except BaseException:
        give_up(lock, created)
        raise
    return lock


def missing_folders(path: Path) -> list[Path]:
    """path and those of its parents that do not exist yet, deepest first: what making path makes."""
    return [p for p in (path, *path.parents) if not p.exists()]


def give_up(lock: RunLock, created: list[Path]) -> None:
    """Let the lock go for a run that ends before it trained: a folder it left holding only the lock
    file loses that file, and the folders the run made for it (missing_folders), when they are empty."""
    with contextlib.suppress(OSError):
        if not _other_files(lock.path.parent):
            lock.remove()
            for folder in created:  # out/, when out/RUN was its first run, is made for nothing too
                folder.rmdir()
    lock.release()


def _other_files(out: Path) -> bool:
    """Whether `out` holds anything but the lock file."""
    return out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir())


def holds_config(out: Path, cfg: TrainConfig) -> bool:
    """Whether out's config.toml is cfg (keys a file written before they existed read as their defaults)."""
    try:
        return (out / CONFIG_FILE).is_file() and TrainConfig(**read_toml(out / CONFIG_FILE)).to_dict() == cfg.to_dict()
    except ConfigError:
        return False


def _check_same_run(out: Path, cfg: TrainConfig) -> None:
    if not holds_config(out, cfg):
        raise ConfigError(f"out_dir {out} already holds a different run; pass --overwrite to replace it, "
                          f"--resume {out / LAST} to continue it, or choose another out_dir")
    step = checkpoint_step(out / LAST)
    if step is not None and not is_finished(out / LAST, cfg):
        of = f"/{cfg.max_iters}" if not cfg.max_time else ""
        raise ConfigError(f"out_dir {out} holds this run stopped at step {step}{of}; continue it "
                          f"with --resume {out / LAST}, or pass --overwrite to start again")


def _check_writable(out: Path) -> None:
    probe = out / f".write-test-{os.getpid()}"
    try:
        probe.touch()  # an empty file: on a full disk the check is check_disk_space's, with its own message
    except OSError as e:
        raise ConfigError(f"cannot write to out_dir {out} ({e.strerror or e}); choose a writable out_dir") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint was saved at; None when there is none or it cannot be read."""
    try:
        return int(ckpt.read_checkpoint_config(path).get("step"))
    except (CheckpointError, TypeError, ValueError):
        return None


def is_finished(path: Path, cfg: TrainConfig) -> bool:
    """Whether the checkpoint at path has done the run cfg describes: its max_iters steps, or under a
    time budget the seconds of cfg.max_time (a larger budget given on resume trains on)."""
    if not cfg.max_time:
        step = checkpoint_step(path)
        return step is not None and step >= cfg.max_iters
    try:
        done = ckpt.read_checkpoint_config(path).get("budget_done_s")
    except CheckpointError:
        return False
    return isinstance(done, (int, float)) and done >= cfg.max_time


def check_disk_space(out: Path, num_parameters: int) -> None:
    """TrainingError when out's disk cannot hold the run's checkpoints (float32 weights), counting
    the space its own checkpoints take now, which the run's saves replace."""
    # last/ holds weights + 2 AdamW moments, best/ the weights; during a save one more copy exists.
    need = num_parameters * 4 * (3 + 1 + 3) + (16 << 20) - _size(out / LAST) - _size(out / BEST)
    free = shutil.disk_usage(out).free
    if free < need:
        raise TrainingError(f"not enough disk space in {out}: checkpoints need ~{need / 2**20:.0f} MiB more, "
                            f"{free / 2**20:.0f} MiB free; free some space or choose another out_dir")


def _size(folder: Path) -> int:
    """Bytes the files under folder take on disk (0 when there is none)."""
    total = 0
    for p in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                total += p.stat().st_size
    return total


def write_failure(out: Path, e: OSError, step: int | None) -> TrainingError | None:
    """The one-line error for a write of the run folder that failed at `step` (None: before the
    first) because the disk is full (or a quota or file-size limit is hit) or a file of the folder
    cannot be written, naming the last good checkpoint and how to go on; None when `e` is not such
    a failure (a bug keeps its traceback)."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in DISK_FULL:
        what, fix = f"the disk of {out} is full{where}: {e.strerror}", "free some space"
    elif e.filename and Path(os.path.abspath(e.filename)).is_relative_to(os.path.abspath(out)):
        what, fix = f"cannot write {e.filename}: {e.strerror or e}", f"make {out} writable"
    else:
        return None
    stopped = "before its first step" if step is None else f"at step {step}"
    saved = checkpoint_step(out / LAST)
    if saved is None:
        return TrainingError(f"{what}; the run stopped {stopped}, before its first checkpoint; {fix} and start "
                             "it again")
    return TrainingError(f"{what}; the run stopped {stopped}; {out / LAST} (step {saved}) is the last good "
                         f"checkpoint: {fix}, then continue with: simplegpt train --resume {out / LAST}")


def write_config(out: Path, cfg: TrainConfig) -> None:
    """config.toml, replaced whole (a full disk cannot leave it half written). Raises TrainingError
    (write_failure) when it cannot be written."""
    tmp = out / f".{CONFIG_FILE}.tmp-{os.getpid()}"
    try:
        tmp.write_text(to_toml(cfg), encoding="utf-8")
        os.replace(tmp, out / CONFIG_FILE)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if (failure := write_failure(out, e, None)) is None:
            raise
        raise failure from None


def append_sample(out: Path, step: int, val_loss: float, sample: str) -> None:
    """Append an evaluation's sample to samples.txt, whole or not at all. Raises OSError naming it."""
    path = out / SAMPLES_FILE
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"=== step {step}, val loss {val_loss:.4f} ===\n{sample}\n\n")
    except OSError as e:
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise OSError(e.errno, e.strerror, str(path)) from None


class Metrics:
    """metrics.jsonl (always) and TensorBoard (when installed and asked for). Each record is one
    write of one line: a write that fails (a full disk) is cut back off, so the file holds whole
    records only, and closing it writes nothing more."""

    def __init__(self, out: Path, keep_until: int | None, tensorboard: bool):
        self.path = out / METRICS_FILE
        # resuming at step k: records after k belong to the lost future of the interrupted run
        self.size = 0 if keep_until is None else _records_until(self.path, keep_until)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        os.ftruncate(self.fd, self.size)  # shrinking needs no space, unlike rewriting the file
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:
                pass

    def write(self, record: dict[str, Any]) -> None:
        """Append the record. Raises OSError naming metrics.jsonl (the file is left as it was)."""
        line = (json.dumps(record) + "\n").encode()
        data = memoryview(line)
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        self.size += len(line)
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self) -> None:
        os.close(self.fd)
        if self.tb is not None:
            with contextlib.suppress(OSError):  # TensorBoard's own writes on a full disk
                self.tb.close()


def _records_until(path: Path, step: int) -> int:
    """The length of the file's longest start made of whole records of steps <= step."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    end = 0
    for line in data.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n") or json.loads(line)["step"] > step:
                break
        except (ValueError, KeyError, TypeError):
            break  # a record cut off by a crash, and what follows it
        end += len(line)
    return end


@dataclass
class MetricRecords:
    """metrics.jsonl's records by kind, in file order."""

    train: list[dict[str, Any]] = field(default_factory=list)  # kind "train": step, loss, lr, tokens, time_s ...
    evals: list[dict[str, Any]] = field(default_factory=list)  # kind "eval": step, val_loss, val_bpb ...
    skipped: int = 0  # lines that are not a whole record


def read_metrics(out: Path) -> MetricRecords:
    """The records of out's metrics.jsonl, the one reader of it (the trainer's loss curve, the run report).

    Lenient by design: a run that is still writing, or was killed while writing, can leave a partial
    last line (Metrics.write cuts a failed write back off, a crash cannot), and a report of such a run
    must still show what was written; so a line that is not a JSON object is skipped and counted in
    `skipped`, and records of other kinds are left out. Raises OSError (FileNotFoundError when out
    has no metrics.jsonl)."""
    records = MetricRecords()
    for line in (out / METRICS_FILE).read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            records.skipped += 1
            continue
        {"train": records.train, "eval": records.evals}.get(record.get("kind"), []).append(record)
    return records


def curve_axes(ylabel: str, xlabel: str = "step") -> tuple[Figure, Axes]:
    """A Figure (made without pyplot: no global state, no display) with one grid of axes, for a run's
    curves; the run report draws its learning-rate and throughput curves on these too."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def loss_figure(records: MetricRecords) -> Figure:
    """The loss curve: train loss per logged step and val loss per evaluation (nats/token)."""
    fig, ax = curve_axes("loss (nats/token)")
    if records.train:
        ax.plot([r["step"] for r in records.train], [r["loss"] for r in records.train], lw=1, label="train")
    if records.evals:
        ax.plot([r["step"] for r in records.evals], [r["val_loss"] for r in records.evals], "o-", label="val")
    if records.train or records.evals:
        ax.legend()
    return fig


def plot_losses(out: Path) -> Path | None:
    """loss.png (loss_figure) from metrics.jsonl; None when matplotlib is missing. Raises OSError when
    it cannot be written (and leaves no partial file)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    fig = loss_figure(read_metrics(out))
    path = out / PLOT_FILE
    tmp = out / f".{PLOT_FILE}.tmp-{os.getpid()}"
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: no half-drawn picture left behind
        raise
    return path
