"""What a run tells people while it trains: the progress bar (plain lines off a terminal), the
estimate of the time left, the train records of metrics.jsonl, and the stop signals it heeds."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any, Callable

from ..config import TrainConfig
from ..console import count
from .hardware import format_mfu, mfu

# The estimate of the time left comes after this many timed steps, or this many seconds of them.
ESTIMATE_STEPS, ESTIMATE_S = 3, 10.0
# Off a terminal, a progress line every log_interval steps, at most one per this many seconds.
LINE_EVERY_S = 5.0


class StopSignals:
    """Turns the first SIGINT/SIGTERM into a flag checked between steps; a second one interrupts, unless
    `keep` (under torchrun: Ctrl-C reaches a worker twice, from the terminal and forwarded by torchrun,
    and the ranks must still save together; torchrun's SIGKILL after its shutdown timeout is the hard stop)."""

    def __init__(self, keep: bool = False) -> None:
        self.received: str | None = None
        self.keep = keep
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if sys.platform != "win32" and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = self.received or signal.Signals(signum).name
        if self.keep:
            return
        for sig, old in self._old.items():
            signal.signal(sig, old)  # a second signal acts at once

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def repeat_warning(cfg: TrainConfig, tokens_per_step: int, train_tokens: int) -> str | None:
    """A warning when the run will go over its training tokens more than ~20 times (it would learn
    them by heart: the val loss rises while the train loss falls)."""
    epochs = cfg.max_iters * tokens_per_step / max(train_tokens, 1)
    if epochs <= 20:
        return None
    twenty = max(1, 20 * train_tokens // tokens_per_step)
    return (f"warning: {cfg.max_iters:,} steps of {tokens_per_step:,} tokens go over the {train_tokens:,} training "
            f"tokens ~{epochs:,.0f} times, and a model learns text seen that often by heart; use more text, or "
            f"--max_iters {twenty} for 20 passes")


def budget_estimate(cfg: TrainConfig, used_s: float, s_per_step: float, timed: int) -> str:
    """What a time-budgeted run has left: its seconds of budget, about how many steps they hold, and
    the evaluations on top (the budget's clock pauses for them)."""
    left = max(cfg.max_time - used_s, 0.0)
    steps = int(left / s_per_step) if s_per_step > 0 else 0
    evals = steps // cfg.eval_interval + 1
    eval_s = s_per_step * evals * cfg.eval_iters / (3 * cfg.grad_accum_steps)
    return (f"time budget: {duration(left)} left of {duration(cfg.max_time)}, ~{steps:,} more steps at "
            f"{s_per_step:.3g} s/step over {timed} steps, and ~{duration(eval_s)} for {count(evals, 'evaluation')} on top")


def estimate(cfg: TrainConfig, step: int, s_per_step: float, timed: int) -> str:
    """The estimated time left, from the mean of `timed` steps (an evaluation costs its eval_iters
    forward passes, about a third of a training step each over grad_accum_steps micro-batches)."""
    left = cfg.max_iters - step
    evals = cfg.max_iters // cfg.eval_interval - step // cfg.eval_interval + (cfg.max_iters % cfg.eval_interval > 0)
    seconds = s_per_step * (left + evals * cfg.eval_iters / (3 * cfg.grad_accum_steps))
    return (f"estimated time: ~{duration(seconds)} for the {left:,} steps left and {count(evals, 'evaluation')} "
            f"({s_per_step:.3g} s/step over {timed} steps)")


class Progress:
    """The bar (a plain line now and then off a terminal: a pipe, a log file), the estimate, and the
    train records of metrics.jsonl, fed once per step. Time spent evaluating is not training speed
    (`after_eval`). A time-budgeted run's bar and estimate count the seconds of its budget
    (training/budget.py), not steps."""

    def __init__(self, cfg: TrainConfig, step: int, show: bool, log: Callable[[str], None], metrics: Any,
                 flops_per_token: float, flops_peak: float | None, elapsed_before: float,
                 t_start: float, budget: Any = None) -> None:
        from tqdm.auto import tqdm

        self.cfg, self.log, self.metrics = cfg, log, metrics
        self.flops_per_token, self.flops_peak = flops_per_token, flops_peak
        self.elapsed_before, self.t_start, self.budget = elapsed_before, t_start, budget
        self.lines = show and not sys.stderr.isatty()
        if budget is not None:  # a bar of the budget's seconds
            self.bar = tqdm(total=round(cfg.max_time), initial=min(round(budget.used_s), round(cfg.max_time)),
                            disable=not show or self.lines, unit="s", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s of the time budget {postfix}")
        else:
            self.bar = tqdm(total=cfg.max_iters, initial=step, disable=not show or self.lines, unit="step",
                            dynamic_ncols=True)
        self.t_last, self.window_tokens = time.perf_counter(), 0
        self.t_line = self.t_last - LINE_EVERY_S
        self.timed, self.timed_s = -1, 0.0  # steps timed for the estimate (the first warms up), and their seconds
        self.paused_s, self.t_pause = 0.0, 0.0  # this process's seconds of evaluations (with saves, samples)

    def elapsed(self, now: float | None = None) -> float:
        """Seconds of training so far, over every run of it (resumes included)."""
        return self.elapsed_before + (now or time.perf_counter()) - self.t_start

    def train_s(self) -> float:
        """Seconds of this process's training so far: from the start of train() (setup included) with the
        evaluations left out (what bench/speedrun.py's clock reads; a resumed run starts it at 0)."""
        now = time.perf_counter()
        return now - self.t_start - self.paused_s - (now - self.t_pause if self.t_pause else 0.0)

    def step(self, step: int, t_step: float, loss: float, lr: float, grad_norm: float, tokens_seen: int,
             tokens: int, stopping: bool, last: bool = False) -> None:
        """Report the step just taken (its start time t_step; last: the run's last step; tokens: the real
        tokens it fed the model, padding left out, which tok/s counts): the estimate once, a train record
        every log_interval steps (and at the last or a stopping one), the bar or a line."""
        cfg = self.cfg
        self.window_tokens += tokens
        now = time.perf_counter()
        tok_s = self.window_tokens / max(now - self.t_last, 1e-9)
        step_mfu = mfu(self.flops_per_token, tok_s, self.flops_peak)  # None on a GPU of unknown peak
        if 0 <= self.timed:
            self.timed, self.timed_s = self.timed + 1, self.timed_s + now - t_step
            if self.timed >= ESTIMATE_STEPS or self.timed_s >= ESTIMATE_S:
                per_step = self.timed_s / self.timed
                self.log(budget_estimate(cfg, self.budget.used_s, per_step, self.timed) if self.budget is not None
                         else estimate(cfg, step, per_step, self.timed))
                self.timed = -2  # said once
        elif self.timed == -1:
            self.timed = 0
        last = last or (self.budget is None and step == cfg.max_iters)
        if step % cfg.log_interval == 0 or last or stopping:
            record = {"kind": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens": tokens_seen, "tok_per_s": tok_s, "mfu": step_mfu, "time_s": self.elapsed(now)}
            if self.budget is not None:
                record["budget_s"] = self.budget.used_s  # the schedule's clock: what the lr followed
            self.metrics.write(record)
            self.t_last, self.window_tokens = now, 0
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", mfu=format_mfu(step_mfu), refresh=False)
        if self.budget is not None:
            self.bar.update(max(0, min(round(self.budget.used_s), self.bar.total) - self.bar.n))
        else:
            self.bar.update(1)
        if self.lines and (step % cfg.log_interval == 0 and now - self.t_line >= LINE_EVERY_S or last):
            self.t_line = now
            where = (f"step {step:,}  {duration(self.budget.used_s)} of {duration(cfg.max_time)} budget"
                     if self.budget is not None else f"step {step:,}/{cfg.max_iters:,}")
            print(f"{where}  loss {loss:.4f}  {tok_s:,.0f} tok/s  "
                  f"MFU {format_mfu(step_mfu)}  {duration(self.elapsed(now))} elapsed", file=sys.stderr, flush=True)

    def before_eval(self) -> None:
        self.t_pause = time.perf_counter()

    def after_eval(self) -> None:
        self.t_last, self.window_tokens = time.perf_counter(), 0
        self.paused_s, self.t_pause = self.paused_s + self.t_last - self.t_pause, 0.0

    def close(self) -> None:
        self.bar.close()
