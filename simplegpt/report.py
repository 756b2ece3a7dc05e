"""The run report: report.html in a run folder, one self-contained page (images inlined, no outside
resources) with the run's config and parameter count, its loss, learning-rate and throughput curves
from metrics.jsonl, the samples of each evaluation from samples.txt and a final summary.

`simplegpt train` writes it at the end; `simplegpt report RUN` writes it again at any time (during a
run too: it reads only what the run has written so far).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError, DataError
from .files import BEST, CONFIG_FILE, LAST, METRICS_FILE, SAMPLES_FILE
from .training.run_dir import MetricRecords, curve_axes, loss_figure, read_metrics

REPORT_FILE = "report.html"
_SAMPLE_HEADER = re.compile(r"^=== step (\d+), val loss (\S+) ===\n", re.MULTILINE)


@dataclass
class RunRecords:
    """What a run folder holds, read leniently (metrics.jsonl as run_dir.read_metrics reads it: a
    partial last line of a run still writing, or killed while writing, is skipped and counted)."""

    folder: Path
    train: list[dict[str, Any]] = field(default_factory=list)  # kind "train" records of metrics.jsonl
    evals: list[dict[str, Any]] = field(default_factory=list)  # kind "eval" records
    samples: list[tuple[int, str, str]] = field(default_factory=list)  # (step, val loss, text)
    config_toml: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # config.toml's settings, when it can be read
    checkpoint: dict[str, Any] | None = None  # last/'s config.json (model, step, metrics ...)
    skipped_lines: int = 0


def run_folder(path: str | Path) -> Path:
    """The run folder `path` names: itself, or the run a checkpoint inside it (RUN/last, RUN/best) belongs
    to. DataError when it holds no metrics.jsonl."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path} is not a folder; give the run folder of a training run (its out_dir)")
    for folder in (path, path.parent):
        if (folder / METRICS_FILE).is_file():
            return folder
    raise DataError(f"{path} is not a simplegpt run folder: it has no {METRICS_FILE}; give the out_dir of a "
                    "training run")


def read_run(path: str | Path) -> RunRecords:
    """A run folder's records (see RunRecords). DataError for a folder that is not a run."""
    from .checkpoint import read_checkpoint_config
    from .config import read_toml

    folder = run_folder(path)
    metrics = read_metrics(folder)
    rec = RunRecords(folder=folder, train=metrics.train, evals=metrics.evals, skipped_lines=metrics.skipped)
    samples = rec.folder / SAMPLES_FILE
    if samples.is_file():
        parts = _SAMPLE_HEADER.split(samples.read_text(encoding="utf-8", errors="replace"))
        rec.samples = [(int(parts[i]), parts[i + 1], parts[i + 2].removesuffix("\n\n"))
                       for i in range(1, len(parts) - 2, 3)]
    if (rec.folder / CONFIG_FILE).is_file():
        rec.config_toml = (rec.folder / CONFIG_FILE).read_text(encoding="utf-8", errors="replace")
        try:
            rec.config = read_toml(rec.folder / CONFIG_FILE)
        except ConfigError:
            rec.config = {}  # shown as text all the same
    try:
        rec.checkpoint = read_checkpoint_config(rec.folder / LAST)
    except CheckpointError:
        rec.checkpoint = None  # no evaluation saved one yet: the report says so
    return rec


def parameter_count(model: dict[str, Any]) -> int:
    """The parameter count of a model config (a GPTConfig dict), from a model of one block built on
    the meta device: no memory is used for weights, and a config naming a million blocks builds one."""
    import torch

    from .model import GPT, GPTConfig

    config = GPTConfig.from_dict(model)
    with torch.device("meta"):
        one = GPT(GPTConfig.from_dict({**model, "n_layer": 1}))
    return one.num_parameters() + (config.n_layer - 1) * sum(p.numel() for p in one.transformer.h[0].parameters())


def summary(rec: RunRecords) -> dict[str, str]:
    """The final summary as label -> text."""
    out: dict[str, str] = {}
    max_iters = rec.config.get("max_iters")
    step = rec.train[-1]["step"] if rec.train else 0
    out["steps"] = f"{step:,}"
    if isinstance(max_iters, int):
        out["steps"] += f" of {max_iters:,}" + ("" if step >= max_iters else
                                                f" (stopped early: continue with simplegpt train --resume {rec.folder})")
    if rec.train:
        last = rec.train[-1]
        out["tokens seen"] = f"{last['tokens']:,}"
        out["time"] = f"{last['time_s']:.1f} s since the run started"
        speeds = sorted(r["tok_per_s"] for r in rec.train)
        out["median throughput"] = f"{speeds[len(speeds) // 2]:,.0f} tokens/s"
        out["last train loss"] = f"{last['loss']:.4f}"
    if rec.evals:
        last = rec.evals[-1]
        out["val loss"] = f"{last['val_loss']:.4f} at step {last['step']:,}"
        if last.get("val_bpb") is not None:
            out["val bits per byte"] = f"{last['val_bpb']:.3f}"
        best = min(rec.evals, key=lambda r: r["val_loss"])
        out["best val loss"] = f"{best['val_loss']:.4f} at step {best['step']:,} ({rec.folder / BEST})"
    out["checkpoint"] = str(rec.folder / LAST) if rec.checkpoint else "none saved yet"
    if rec.skipped_lines:
        out["unreadable records"] = f"{rec.skipped_lines} line(s) of {METRICS_FILE} skipped"
    return out


def _curves(rec: RunRecords) -> list[tuple[str, Any]]:
    """(caption, Figure) for loss, learning rate and throughput."""
    figs = [("Loss", loss_figure(MetricRecords(rec.train, rec.evals)))]
    fig, ax = curve_axes("learning rate")
    ax.plot([r["step"] for r in rec.train], [r["lr"] for r in rec.train], color="tab:green")
    figs.append(("Learning rate", fig))
    fig, ax = curve_axes("tokens per second", "time since the start (s)")
    ax.plot([r["time_s"] for r in rec.train], [r["tok_per_s"] for r in rec.train], color="tab:purple", lw=1)
    figs.append(("Throughput", fig))
    return figs


def report_html(rec: RunRecords) -> str:
    """The report page of a run's records."""
    from .learn.page import html_page, img_tag, png_bytes, table

    model = (rec.checkpoint or {}).get("model")
    body = ["<h2>Summary</h2>", table(summary(rec)), "<h2>Model</h2>"]
    if model:
        body.append(table({"parameters": f"{parameter_count(model):,}",
                           "shape": f"{model['n_layer']} layers, {model['n_head']} heads, {model['n_embd']} wide, "
                                    f"context {model['n_positions']}, vocabulary {model['vocab_size']}"}))
    else:
        body.append('<p class="note">parameter count: no checkpoint saved yet</p>')
    body.append("<h2>Curves</h2>")
    for caption, fig in _curves(rec):
        body.append(f"<h3>{html.escape(caption)}</h3>{img_tag(png_bytes(fig), caption)}")
    body.append("<h2>Samples</h2>")
    if not rec.samples:
        body.append('<p class="note">no samples (sample_tokens = 0, or no evaluation yet)</p>')
    for step, val_loss, text in rec.samples:
        body.append(f"<h3>step {step:,}, val loss {html.escape(val_loss)}</h3><pre>{html.escape(text)}</pre>")
    body.append(f"<h2>Config</h2><pre>{html.escape(rec.config_toml or '(no config.toml)')}</pre>")
    return html_page(f"simplegpt run report: {rec.folder.resolve().name}", "\n".join(body))


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of run folder `run` (or of the run a checkpoint in it belongs to) to out, by
    default RUN/report.html, atomically; returns its path. DataError when run is not a run folder;
    OSError when the page cannot be written."""
    from .learn.page import write_text_atomic

    rec = read_run(run)
    return write_text_atomic(Path(out) if out is not None else rec.folder / REPORT_FILE, report_html(rec))
