"""The training loop: `train(cfg)` runs a whole TrainConfig and returns a TrainResult.

It reads top to bottom: pick the way of running (ways.select: one process, CPU core shards, DDP or
FSDP2, one object behind one interface), the named setup steps (setup: begin, load_data, prepare),
then `_run`, the loop: step, evaluate, save, sample, stop. The loop calls the way of running for
everything that differs between them and never the process group itself.

Resuming restores model, optimizer, step, sampler and every RNG, so the per-step losses equal an
uninterrupted run's bit for bit on CPU. Ctrl-C / SIGTERM finish the current step, save last/ and
return; a non-finite loss or gradient norm stops the run before the optimizer applies it, so last/
stays the last good state. Each evaluation saves its checkpoints before it draws a sample. A run
that is already finished is not trained again: train() returns its result (already_finished)
unless overwrite.

Under torchrun the ranks train one run together (docs/distributed.md): each rank its share of every
step's micro-batches, rank 0 alone writing the run folder; the losses are those of one process
accumulating the same global batch.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import TrainConfig, long_warmup_warning
from ..console import count, survives_closed_output
from ..devices import resolve_device
from . import TrainingError, hardware, run_dir, ways
from .budget import Budget, Clock
from .cpu_memory import keep_freed_memory
from .evaluation import evaluate, sample_text
from .hardware import device_peak_flops
from .loss import weights
from .optimizer import lr_at, lr_at_fraction, make_optimizer
from .progress import Progress, StopSignals, repeat_warning
from .result import TrainResult
from .run_dir import BEST, LAST
from .setup import Data, Start, Training, begin, load_data, prepare

__all__ = ["TrainResult", "evaluate", "train"]


@survives_closed_output  # a reader of the output that left (`| tee`) must not stop a save or the run
def train(cfg: TrainConfig, resume: str | os.PathLike | None = None, overwrite: bool = False,
          stop_at: int | None = None, progress: bool = True, log: Callable[[str], None] | None = None,
          clock: Clock | None = None) -> TrainResult:
    """Run (or resume from checkpoint or run folder `resume`) the training run cfg describes; see the
    module docstring. stop_at: stop with a checkpoint after this step. ConfigError, DataError and
    CheckpointError for what cannot start; TrainingError for a run that cannot go on. A run already
    finished (resumed, or started again with the config of the run in out_dir) is not trained again:
    the result is read from its last/ checkpoint, with already_finished set.

    Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) the processes train one run together
    (simplegpt.training.distributed, docs/distributed.md): every rank calls train() with the same
    arguments; rank 0 alone prints and writes the run folder, and every rank returns the result.
    resume="auto": cfg.out_dir's last checkpoint when it has one, else a fresh start (for restarts).
    clock: what a time-budgeted run (cfg.max_time) reads its seconds from (training/budget.py);
    time.perf_counter unless given."""
    from tqdm.auto import tqdm

    if resume == "auto":
        resume = Path(cfg.out_dir) / LAST if run_dir.checkpoint_step(Path(cfg.out_dir) / LAST) is not None else None
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    hardware.configure_backends(device)  # TF32 and SDPA's flash kernel on CUDA; nothing on a CPU
    way = ways.select(cfg, device)
    try:
        say = (log or (lambda s: tqdm.write(s))) if way.is_main else (lambda s: None)
        start = begin(cfg, way, resume, overwrite, stop_at, progress and way.is_main)
        if start.finished is not None:
            return start.finished
        try:
            data = load_data(start, way)
            training = prepare(start, data, way, make_optimizer)
            budget = Budget.resumed(cfg.max_time, clock, start.state) if cfg.max_time else None
            return _run(start, data, training, way, stop_at, progress and way.is_main, say, t_start, budget)
        finally:
            start.lock.release()
    finally:
        way.close()


def _run(start: Start, data: Data, training: Training, way: ways.WayOfRunning, stop_at: int | None,
         show: bool, log: Callable[[str], None], t_start: float, budget: Budget | None) -> TrainResult:
    """The loop: from training.step to cfg.max_iters, or to the end of the time budget (or a stop),
    then the summary."""
    cfg, out, model, optimizer = start.cfg, start.out, training.model, training.optimizer
    metrics, flops_peak = _announce(start, data, training, way, log)
    progress = Progress(cfg, training.step, show, log, metrics,
                        model.flops_per_token(cfg.block_size),  # once: counting parameters walks the model
                        flops_peak, training.elapsed_before, t_start, budget)
    loss_fn = training.compute.loss
    result = TrainResult(out_dir=out, step=training.step, tokens_seen=training.tokens_seen, elapsed_s=0.0)

    def save(name: str, val_loss: float | None, with_state: bool, last: bool) -> None:
        _save(way, start, data, training, name, val_loss, progress.elapsed() if with_state else None, budget, last)

    try:
        with StopSignals(keep=way.launched) as signals, keep_freed_memory(way.device.type == "cpu"):
            last = budget is None and training.step >= cfg.max_iters
            while not last:
                t_step, step = time.perf_counter(), training.step + 1
                if budget is not None:  # the schedule follows the fraction of the budget used
                    fraction, last = budget.plan()
                    lr = lr_at_fraction(fraction, cfg)
                else:
                    last, lr = step >= cfg.max_iters, lr_at(training.step, cfg)
                for group in optimizer.param_groups:  # a group may run at a multiple of the schedule's lr
                    group["lr"] = lr * group.get("lr_ratio", 1.0)
                # Every rank draws every micro-batch of the step: each knows the step's loss tokens, no collective.
                batches = [loss_fn.prepare(data.train.next_batch()) for _ in range(cfg.grad_accum_steps)]
                step_weights = weights([loss_fn.tokens(batch) for batch in batches])
                step_tokens = sum(_real_tokens(batch) for batch in batches)
                loss = way.forward_backward(batches, step_weights)
                loss, received = way.step_over_ranks(loss, signals.received)
                if not math.isfinite(loss):
                    raise TrainingError(f"the loss became {loss} at step {step} (lr {lr:.3g}); the run stopped and "
                                        f"{_last_good(out)}; lower --lr or set --grad_clip")
                grad_norm = way.clip_and_step(optimizer, cfg.grad_clip)
                if cfg.grad_clip > 0 and not math.isfinite(grad_norm) and not training.compute.scaler.is_enabled():
                    # the optimizer did not apply it (under fp16 the scaler skips such steps by design)
                    raise TrainingError(f"the gradient norm became {grad_norm} at step {step} (lr {lr:.3g}); the "
                                        f"step was not applied, the run stopped and {_last_good(out)}; lower --lr")
                optimizer.zero_grad(set_to_none=True)
                training.step, training.tokens_seen = step, training.tokens_seen + step_tokens
                result.losses.append(loss)
                if budget is not None and budget.step_done():
                    last = True  # a step that ran past the budget it was not expected to reach ends it too
                stop = received or ("stop_at" if stop_at is not None and step >= stop_at else None)
                progress.step(step, t_step, loss, lr, grad_norm, training.tokens_seen, step_tokens, stopping=bool(stop),
                              last=last)

                if step % cfg.eval_interval == 0 or last:
                    progress.before_eval()
                    # Evaluation and sampling use their own RNG, so they never change the training stream.
                    with _own_rng(way.device):
                        val_loss = way.evaluate(data.val, cfg.eval_iters)
                    if not math.isfinite(val_loss):
                        raise TrainingError(f"the validation loss became {val_loss} at step {step}; the run "
                                            f"stopped and {_last_good(out)}; lower --lr or set --grad_clip")
                    result.val_loss, result.val_bpb = val_loss, data.bpb(val_loss)
                    metrics.write({"kind": "eval", "step": step, "val_loss": val_loss, "val_bpb": data.bpb(val_loss),
                                   "tokens": training.tokens_seen, "train_s": progress.train_s()})
                    log(f"step {step}: val loss {val_loss:.4f}, {data.bpb(val_loss):.3f} bits/byte")
                    # The checkpoints first: nothing optional (the sample) can lose the steps done.
                    if val_loss < training.best_val:
                        training.best_val = val_loss
                        save(BEST, val_loss, with_state=False, last=last)
                    save(LAST, val_loss, with_state=True, last=last)
                    if cfg.sample_tokens and way.samples and way.is_main:
                        with _own_rng(way.device):
                            sample = sample_text(model, data.tokenizer, cfg.sample_prompt, cfg.sample_tokens,
                                                 way.device, cfg.seed)
                        if sample:
                            log(f"--- sample at step {step} ---\n{sample}\n---")
                            run_dir.append_sample(out, step, val_loss, sample)
                    way.barrier()  # the other ranks wait here while rank 0 saves and samples
                    progress.after_eval()  # eval time is not training speed, nor training time
                    if budget is not None:
                        budget.resume_clock()  # nor is it the budget's

                stop = stop or way.stop_now(signals.received)  # one during the evaluation
                if stop and not last:
                    if step % cfg.eval_interval:
                        save(LAST, None, with_state=True, last=False)
                        way.barrier()
                    result.interrupted = stop
                    log(f"stopped at step {step} ({stop}); checkpoint saved to {out / LAST}; "
                        f"continue with: {way.resume_command()} --resume {out / LAST}")
                    break
    except OSError as e:  # a full disk, or a file of the run folder that cannot be written
        if (failure := run_dir.write_failure(out, e, training.step)) is None:
            raise
        raise failure from None
    finally:
        progress.close()
        metrics.close()
    result.step, result.tokens_seen = training.step, training.tokens_seen
    result.best_val_loss = training.best_val if math.isfinite(training.best_val) else None
    result.elapsed_s = progress.elapsed()
    if way.is_main:
        _draw(cfg, out, result, log)
    return result


def _save(way: ways.WayOfRunning, start: Start, data: Data, training: Training, name: str, val_loss: float | None,
          elapsed_s: float | None, budget: Budget | None, last: bool) -> None:
    """Checkpoint out/name through the way of running: the weights and what the run was at; with
    elapsed_s (a last/), the train state for an exact resume too. A time-budgeted run records the
    seconds of budget done (run_dir.is_finished reads them) and, in the train state, its budget."""
    metadata = {"train_config": start.cfg.to_dict(), "step": training.step, "tokens_seen": training.tokens_seen,
                "metrics": {"val_loss": val_loss, "val_bpb": data.bpb(val_loss), "best_val_loss": training.best_val},
                "dataset": data.info()}
    if budget is not None:
        metadata["budget_done_s"] = budget.done_s(last)
    state = training.train_state(data.train, elapsed_s) if elapsed_s is not None else None
    if state is not None and budget is not None:
        state.update(budget.state_dict())
    way.save(start.out / name, training.model, data.tokenizer, metadata, state, training.optimizer)


def _announce(start: Start, data: Data, training: Training, way: ways.WayOfRunning,
              log: Callable[[str], None]) -> tuple[Any, float | None]:
    """Rank 0 writes config.toml and opens metrics.jsonl (a resume keeps its records up to its step);
    the start lines: what trains, on what, and what to expect. Returns the metrics writer and the
    run's peak FLOP/s for MFU (every rank's devices; None: unknown)."""
    cfg, model, meta = start.cfg, training.model, data.meta
    metrics: Any = _NoMetrics()
    if way.is_main:
        run_dir.write_config(start.out, cfg)
        metrics = run_dir.Metrics(start.out, keep_until=training.step if start.state is not None else None,
                                  tensorboard=cfg.tensorboard)
    if start.note:
        log(start.note)
    for note in way.notes(cfg):
        log(note)
    dtype = str(start.dtype).removeprefix("torch.")
    log(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {count(cfg.n_layer, 'layer')}, {cfg.n_embd} wide, "
        f"block {cfg.block_size}; data: {data.dir} ({meta['tokens']['train']:,} train tokens); device: "
        f"{way.device}, {dtype}, {count(way.threads, 'thread')}{way.describe(cfg)}; "
        f"run folder: {start.out}")
    flops_peak, peak_basis = device_peak_flops(cfg, way.device, way.threads) if way.is_main else (1.0, "")
    log(f"MFU (model FLOPs utilization) is against {way.peak_basis(peak_basis)}")
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * cfg.block_size
    # A time-budgeted run has no count of steps to warn about: its warmup is warmup_fraction of the time.
    warnings = () if cfg.max_time else (repeat_warning(cfg, tokens_per_step, meta["tokens"]["train"]),
                                        long_warmup_warning(cfg))
    for warning in warnings:
        if warning is not None:
            log(warning)
    return metrics, flops_peak * way.world if flops_peak is not None else None


class _NoMetrics:
    """What ranks other than 0 write metrics to: nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _real_tokens(batch: tuple[torch.Tensor, ...]) -> int:
    """The tokens a micro-batch feeds the model: its attention mask's ones when it has one (padded rows,
    fine-tuning's conversations: padding is no work done), else every position of x (B, T)."""
    return int(batch[2].sum()) if len(batch) > 2 and batch[2] is not None else batch[0].numel()


def _own_rng(device: torch.device) -> Any:
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _last_good(out: Path) -> str:
    """What the message of a run stopped by a fault says of its last good state."""
    if (out / LAST).is_dir():
        return f"{out / LAST} keeps the last good state"
    return "no checkpoint was saved before it (the first is saved at the first evaluation)"


def _draw(cfg: TrainConfig, out: Path, result: TrainResult, log: Callable[[str], None]) -> None:
    """The loss curve (a finished run) and the run report, when cfg.plot; never a failure of the run."""
    if not cfg.plot:
        return
    if result.interrupted is None:
        try:
            png = run_dir.plot_losses(out)
            log(f"loss curve: {png}" if png else
                'loss curve: not drawn, matplotlib is not installed (pip install "simplegpt-toolkit[plot]")')
        except OSError as e:  # the run is saved: a picture that cannot be written does not fail it
            log(f"loss curve: not drawn ({e.strerror or e})")
    try:  # the run is saved by now: a report that cannot be drawn must not turn it into a failure
        from ..report import write_report

        log(f"report: {write_report(out)}")
    except Exception as e:
        log(f"report: not written ({type(e).__name__}: {e}); try again with: simplegpt report {out}")
