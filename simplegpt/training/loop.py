"""The training loop: `train(cfg)` runs a whole TrainConfig and returns a TrainResult.

It only orchestrates: the data (dataset), the weights (start), the optimizer and schedule
(optimizer), the machine (hardware) and the run folder (run_dir). Resuming restores model,
optimizer, step, sampler and every RNG, so the per-step losses equal an uninterrupted run's bit for
bit on CPU. Ctrl-C / SIGTERM finish the current step, save last/ and return; a non-finite loss
stops the run before the optimizer step, so last/ stays the last good state.

The steps run through the step module: torch.compile(model), or on a CPU the training kernels'
twin of the model (simplegpt.accel.cpu.for_training, sharing its parameters); checkpoints and
samples come from the model itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .. import checkpoint as ckpt
from ..accel import cpu
from ..config import TrainConfig
from ..data import load_dataset_tokenizer
from ..devices import resolve_device
from ..errors import ConfigError
from ..model import GPT
from ..tokenizer import Tokenizer
from . import TrainingError, run_dir
from .core_shards import CoreShards
from .cpu_memory import keep_freed_memory
from .dataset import make_samplers, prepare_data
from .hardware import auto_threads, core_shards, peak_flops, resolve_dtype
from .optimizer import lr_at, make_optimizer
from .run_dir import BEST, LAST
from .start import init_model, load_resume, rng_state, seed_everything, set_rng_state


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
    losses: list[float] = field(default_factory=list)

    @property
    def last_checkpoint(self) -> Path:
        return self.out_dir / LAST


class _StopSignals:
    """Turns the first SIGINT/SIGTERM into a flag checked between steps; a second one interrupts."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if sys.platform != "win32" and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        for sig, old in self._old.items():
            signal.signal(sig, old)  # a second signal acts at once

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _forward(model: nn.Module, batch: tuple, device: torch.device, autocast: Any) -> torch.Tensor:
    x, y, *mask = (t.to(device, non_blocking=True) for t in batch)
    with autocast:
        if isinstance(model, GPT):  # not a compiled wrapper: loss() may run the whole step in the kernels
            return model.loss(x, y, attention_mask=mask[0] if mask else None)
        _, loss = model(x, y, attention_mask=mask[0] if mask else None)
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, make_sampler: Callable[[], Any], iters: int, device: torch.device,
             autocast: Any) -> float:
    """Mean val loss over the same `iters` batches every time (model is left in train mode)."""
    model.eval()
    sampler = make_sampler()
    losses = [float(_forward(model, sampler.next_batch(), device, autocast)) for _ in range(iters)]
    model.train()
    return sum(losses) / len(losses)


def sample_text(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, device: torch.device,
                seed: int) -> str:
    """A sample for people to read at eval time (temperature 0.8, top-k 50, seeded); ends at EOS."""
    from ..engine import Engine, SamplingParams

    ids = (tokenizer.encode(prompt) if prompt else [tokenizer.eos_id])[-model.config.n_positions:]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=seed)
    # The engine leaves the model as it is (layout, mode), so training goes on bit for bit as a resumed run would.
    [result] = Engine(model, tokenizer, device=device).generate([ids], params)
    return prompt + result.text


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None, overwrite: bool = False,
          stop_at: int | None = None, progress: bool = True, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume from checkpoint or run folder `resume`) the training run cfg describes; see the
    module docstring. stop_at: stop with a checkpoint after this step. ConfigError, DataError and
    CheckpointError for what cannot start; TrainingError for a run that cannot go on."""
    from tqdm.auto import tqdm

    log = log or (lambda s: tqdm.write(s))
    t_start = time.perf_counter()
    threads = cfg.num_threads or auto_threads()
    torch.set_num_threads(threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    n_shards = core_shards(cfg, device, dtype, threads)
    seed_everything(cfg.seed)

    state: dict[str, Any] | None = None
    if resume is not None:
        resume = run_dir.checkpoint_dir(resume)
        model, tokenizer, state = load_resume(resume, cfg, device)
        out = resume.parent
        cfg = cfg.replace(out_dir=str(out))
        note = f"resuming {resume} at step {state['step']}"
    else:
        model, tokenizer, note = init_model(cfg, device)
        out = Path(cfg.out_dir)
        if model is not None:
            cfg = cfg.replace(model=model.config, tokenizer=tokenizer.kind)
    if stop_at is not None and stop_at <= (state["step"] if state else 0):
        raise ConfigError(f"stop_at must be after the starting step {(state or {}).get('step', 0)}")

    created_out = not out.exists()
    run_dir.check_out_dir(out, cfg, overwrite, resuming=state is not None)
    try:
        data_dir, meta = prepare_data(cfg, tokenizer, progress)
        if tokenizer is None:
            tokenizer = load_dataset_tokenizer(data_dir)
        if model is None:
            model = GPT(dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"])).to(device)
        run_dir.check_disk_space(out, model.num_parameters())
        train_sampler, val_sampler = make_samplers(cfg, data_dir, meta)
    except BaseException:
        if created_out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # nothing was trained: leave no empty run folder behind
        raise
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    optimizer = make_optimizer(model, cfg, device, scaler)
    step, tokens_seen, best_val, elapsed_before = 0, 0, math.inf, 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        train_sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        best_val, elapsed_before = state["best_val_loss"], state["elapsed_s"]
    run_dir.write_config(out, cfg)
    metrics = run_dir.Metrics(out, keep_until=step if state is not None else None, tensorboard=cfg.tensorboard)

    # The module the steps run: compiled, or with the CPU training kernels on modules sharing the parameters.
    step_model = torch.compile(model) if cfg.compile else cpu.for_training(model)
    step_model.train()  # before CoreShards copies it
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * cfg.block_size
    flops_peak = peak_flops(cfg, device)
    flops_per_token = model.flops_per_token(cfg.block_size)  # once: counting parameters walks the model
    bytes_per_token = meta["val_bytes_per_token"]
    dataset_info = {k: meta[k] for k in ("source", "tokens", "vocab_size", "val_bytes_per_token")}
    dataset_info["dir"] = str(data_dir)
    if note:
        log(note)
    shards = CoreShards(step_model, n_shards) if n_shards > 1 else None
    log(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {cfg.n_layer} layers, {cfg.n_embd} wide, "
        f"block {cfg.block_size}; data: {data_dir} ({meta['tokens']['train']:,} train tokens); device: {device}, "
        f"{str(dtype).removeprefix('torch.')}, {threads} threads"
        f"{f' (each batch split {n_shards} ways)' if shards else ''}; run folder: {out}")

    def save(name: str, val_loss: float | None, with_state: bool) -> Path:
        metadata = {"train_config": cfg.to_dict(), "step": step, "tokens_seen": tokens_seen,
                    "metrics": {"val_loss": val_loss, "val_bpb": bpb(val_loss), "best_val_loss": best_val},
                    "dataset": dataset_info}
        train_state = None
        if with_state:
            train_state = {"step": step, "tokens_seen": tokens_seen, "optimizer": optimizer.state_dict(),
                           "scaler": scaler.state_dict(), "sampler": train_sampler.state_dict(), "rng": rng_state(),
                           "best_val_loss": best_val, "elapsed_s": elapsed_before + time.perf_counter() - t_start}
        return ckpt.save_checkpoint(out / name, model, tokenizer, metadata=metadata, train_state=train_state)

    def bpb(loss: float | None) -> float | None:
        return None if loss is None else loss / (math.log(2) * bytes_per_token)

    result = TrainResult(out_dir=out, step=step, tokens_seen=tokens_seen, elapsed_s=0.0,
                         best_val_loss=best_val if math.isfinite(best_val) else None)
    bar = tqdm(total=cfg.max_iters, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    t_last, window_tokens = time.perf_counter(), 0
    try:
        with _StopSignals() as signals, keep_freed_memory(device.type == "cpu"):
            while step < cfg.max_iters:
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = 0.0
                for _ in range(cfg.grad_accum_steps):
                    if shards is not None:
                        torch.set_num_threads(1)  # one core per share of the batch
                        loss_sum += shards.forward_backward(train_sampler.next_batch(), 1 / cfg.grad_accum_steps)
                        continue
                    loss = _forward(step_model, train_sampler.next_batch(), device, autocast)
                    loss_sum += float(loss.detach())
                    scaler.scale(loss / cfg.grad_accum_steps).backward()
                step_loss = loss_sum / cfg.grad_accum_steps
                if not math.isfinite(step_loss):
                    raise TrainingError(
                        f"the loss became {step_loss} at step {step + 1} (lr {lr:.3g}); the run stopped and "
                        f"{out / LAST} keeps the last good state; lower --lr or set --grad_clip")
                # On torch's current thread count: 1 in a split step, where a second OpenMP thread would
                # spin on the core that the next step's other share needs (measured 15% slower steps).
                grad_norm = optimizer.clip_and_step(cfg.grad_clip)
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += tokens_per_step
                window_tokens += tokens_per_step
                result.losses.append(step_loss)

                now = time.perf_counter()
                tok_s = window_tokens / max(now - t_last, 1e-9)
                mfu = flops_per_token * tok_s / flops_peak
                stop = signals.received or ("stop_at" if stop_at is not None and step >= stop_at else None)
                if step % cfg.log_interval == 0 or step == cfg.max_iters or stop:
                    metrics.write({"kind": "train", "step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                                   "tokens": tokens_seen, "tok_per_s": tok_s, "mfu": mfu,
                                   "time_s": elapsed_before + now - t_start})
                    t_last, window_tokens = now, 0
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}", refresh=False)
                bar.update(1)

                if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                    torch.set_num_threads(threads)
                    # Evaluation and sampling use their own RNG, so they never change the training stream.
                    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                        val_loss = evaluate(step_model, val_sampler, cfg.eval_iters, device, autocast)
                        sample = (sample_text(model, tokenizer, cfg.sample_prompt, cfg.sample_tokens, device,
                                              cfg.seed) if cfg.sample_tokens else "")
                    if not math.isfinite(val_loss):
                        raise TrainingError(
                            f"the validation loss became {val_loss} at step {step}; the run stopped and "
                            f"{out / LAST} keeps the last good state; lower --lr or set --grad_clip")
                    result.val_loss, result.val_bpb = val_loss, bpb(val_loss)
                    metrics.write({"kind": "eval", "step": step, "val_loss": val_loss, "val_bpb": bpb(val_loss),
                                   "tokens": tokens_seen})
                    log(f"step {step}: val loss {val_loss:.4f}, {bpb(val_loss):.3f} bits/byte")
                    if sample:
                        log(f"--- sample at step {step} ---\n{sample}\n---")
                        run_dir.append_sample(out, step, val_loss, sample)
                    if val_loss < best_val:
                        best_val = val_loss
                        save(BEST, val_loss, with_state=False)
                    save(LAST, val_loss, with_state=True)
                    t_last, window_tokens = time.perf_counter(), 0  # eval time is not training speed

                stop = stop or signals.received
                if stop and step < cfg.max_iters:
                    if step % cfg.eval_interval:
                        save(LAST, None, with_state=True)
                    result.interrupted = stop
                    log(f"stopped at step {step} ({stop}); checkpoint saved to {out / LAST}; "
                        f"continue with: simplegpt train --resume {out / LAST}")
                    break
    finally:
        bar.close()
        metrics.close()
        if shards is not None:
            shards.close()
            torch.set_num_threads(threads)
    result.step, result.tokens_seen = step, tokens_seen
    result.best_val_loss = best_val if math.isfinite(best_val) else None
    result.elapsed_s = elapsed_before + time.perf_counter() - t_start
    if cfg.plot and result.interrupted is None:
        png = run_dir.plot_losses(out)
        log(f"loss curve: {png}" if png else
            'loss curve: not drawn, matplotlib is not installed (pip install "simplegpt-toolkit[plot]")')
    return result
