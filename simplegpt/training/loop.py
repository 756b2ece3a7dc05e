"""The training loop: `train(cfg)` runs a whole TrainConfig and returns a TrainResult.

It only orchestrates: the data (dataset), the weights (start), the optimizer and schedule
(optimizer), the machine (hardware) and the run folder (run_dir). Resuming restores model,
optimizer, step, sampler and every RNG, so the per-step losses equal an uninterrupted run's bit for
bit on CPU. Ctrl-C / SIGTERM finish the current step, save last/ and return; a non-finite loss or
gradient norm stops the run before the optimizer applies it, so last/ stays the last good state.
Everything that can be checked is checked before step 1 (the sample prompt against the tokenizer
included), and each evaluation saves its checkpoints before it draws a sample. A run that is already
finished is not trained again: train() returns its result (already_finished) unless overwrite.

The steps run through the step module: torch.compile(model), or on a CPU the training kernels'
twin of the model (simplegpt.accel.cpu.for_training, sharing its parameters); checkpoints and
samples come from the model itself.

Under torchrun the ranks train one run together (distributed.py, docs/distributed.md): DDP over the
same step module, each rank its share of every step's micro-batches, rank 0 alone writing the run
folder; the losses are those of one process accumulating the same global batch.
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
from ..console import survives_closed_output
from ..config import TrainConfig, long_warmup_warning
from ..data.shards import load_dataset_tokenizer
from ..devices import resolve_device
from ..errors import CheckpointError, ConfigError
from ..model import GPT, IGNORE_INDEX
from ..tokenizer import Tokenizer
from . import TrainingError, distributed, fsdp, hardware, run_dir
from .core_shards import CoreShards
from .cpu_memory import keep_freed_memory
from .dataset import make_samplers, prepare_data
from .hardware import auto_threads, core_shards, device_peak_flops, format_mfu, mfu, resolve_dtype
from .optimizer import lr_at, make_optimizer
from .run_dir import BEST, LAST
from .start import check_resume_compatible, init_model, load_resume, rng_state, seed_everything, set_rng_state


# The estimate of the time left comes after this many timed steps, or this many seconds of them.
ESTIMATE_STEPS, ESTIMATE_S = 3, 10.0
# Off a terminal, a progress line every log_interval steps, at most one per this many seconds.
LINE_EVERY_S = 5.0


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


class _StopSignals:
    """Turns the first SIGINT/SIGTERM into a flag checked between steps; a second one interrupts, unless
    `keep` (under torchrun: Ctrl-C reaches a worker twice, from the terminal and forwarded by torchrun,
    and the ranks must still save together; torchrun's SIGKILL after its shutdown timeout is the hard stop)."""

    def __init__(self, keep: bool = False) -> None:
        self.received: str | None = None
        self.keep = keep
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
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


def _forward(model: nn.Module, batch: tuple, device: torch.device, autocast: Any) -> torch.Tensor:
    x, y, *mask = (t.to(device, non_blocking=True) for t in batch)
    with autocast:
        if isinstance(model, GPT):  # not a compiled wrapper: loss() may run the whole step in the kernels
            return model.loss(x, y, attention_mask=mask[0] if mask else None)
        _, loss = model(x, y, attention_mask=mask[0] if mask else None)
    return loss


def loss_tokens(batch: tuple) -> int:
    """The number of targets of a batch (x, y[, attention_mask]) that take a loss: those of y (B, T) that are
    not IGNORE_INDEX (padding, and later the masked parts of fine-tuning rows)."""
    return int((batch[1] != IGNORE_INDEX).sum())


def evaluate(model: nn.Module, make_sampler: Callable[[], Any], iters: int, device: torch.device,
             autocast: Any) -> float:
    """The val loss over the same `iters` batches every time: the mean over all their loss tokens (in
    padded batches a long row weighs as its tokens, not as one row). The model is left in train mode."""
    loss_sum, tokens = _eval_sum(model, make_sampler, iters, device, autocast)
    return loss_sum / tokens


@torch.no_grad()
def _eval_sum(model: nn.Module, make_sampler: Callable[[], Any], iters: int, device: torch.device, autocast: Any,
              rank: int = 0, world: int = 1, same_count: bool = False) -> tuple[float, int]:
    """The summed per-token val losses of batches rank, rank + world, ... of the `iters` batches of the
    (always identical) validation sequence, and their number of loss tokens; summed over the ranks they
    are the single process's. same_count: every rank runs as many forward passes (a sharded model's
    forward is a collective), the ranks short of one run their last batch again, uncounted."""
    model.eval()
    sampler = make_sampler()
    total, tokens, mine = 0.0, 0, None
    for i in range(iters):
        batch = sampler.next_batch()
        if i % world == rank:
            mine = batch
            count = loss_tokens(batch)
            total += float(_forward(model, batch, device, autocast)) * count  # a batch's loss is its tokens' mean
            tokens += count
    if same_count and iters % world and rank >= iters % world:
        _forward(model, mine if mine is not None else batch, device, autocast)
    model.train()
    return total, tokens


def sample_text(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, device: torch.device,
                seed: int) -> str:
    """A sample for people to read at eval time (temperature 0.8, top-k 50, seeded); ends at EOS."""
    from ..engine import Engine, SamplingParams

    ids = (tokenizer.encode(prompt) if prompt else [tokenizer.eos_id])[-model.config.n_positions:]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=seed)
    # The engine leaves the model as it is (layout, mode), so training goes on bit for bit as a resumed run would.
    [result] = Engine(model, tokenizer, device=device).generate([ids], params)
    return prompt + result.text


def _finished_run(out: Path, cfg: TrainConfig) -> Path | None:
    """out's last/ when out holds this very run (the same config) and it has done its max_iters."""
    step = run_dir.checkpoint_step(out / LAST) if run_dir.holds_config(out, cfg) else None
    return out / LAST if step is not None and step >= cfg.max_iters else None


def _finished_result(last: Path) -> TrainResult:
    """The TrainResult of a finished run, read from its last/ checkpoint (nothing is trained)."""
    doc = ckpt.read_checkpoint_config(last)
    found = doc.get("metrics") if isinstance(doc.get("metrics"), dict) else {}
    state = ckpt.load_train_state(last)
    return TrainResult(out_dir=last.parent, step=int(doc["step"]), tokens_seen=int(doc.get("tokens_seen", 0)),
                       elapsed_s=float(state.get("elapsed_s", 0.0)), val_loss=found.get("val_loss"),
                       val_bpb=found.get("val_bpb"), best_val_loss=found.get("best_val_loss"), already_finished=True)


def _check_sample_prompt(cfg: TrainConfig, tokenizer: Tokenizer) -> None:
    """ConfigError, before step 1, for a sample prompt the tokenizer cannot encode (it would fail at
    the first evaluation)."""
    if not (cfg.sample_tokens and cfg.sample_prompt):
        return
    try:
        tokenizer.encode(cfg.sample_prompt)
    except ValueError as e:
        raise ConfigError(f"sample_prompt {cfg.sample_prompt!r} does not fit the corpus's {tokenizer.kind} "
                          f"vocabulary ({e}); give a prompt made of the corpus's text, or --sample_prompt '' "
                          "to sample from the start of a document") from None


def _last_good(out: Path) -> str:
    """What the message of a run stopped by a fault says of its last good state."""
    if (out / LAST).is_dir():
        return f"{out / LAST} keeps the last good state"
    return "no checkpoint was saved before it (the first is saved at the first evaluation)"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _repeat_warning(cfg: TrainConfig, step: int, tokens_per_step: int, train_tokens: int) -> str | None:
    """A warning when the run will go over its training tokens more than ~20 times (it would learn
    them by heart: the val loss rises while the train loss falls)."""
    epochs = cfg.max_iters * tokens_per_step / max(train_tokens, 1)
    if epochs <= 20:
        return None
    twenty = max(1, 20 * train_tokens // tokens_per_step)
    return (f"warning: {cfg.max_iters:,} steps of {tokens_per_step:,} tokens go over the {train_tokens:,} training "
            f"tokens ~{epochs:,.0f} times, and a model learns text seen that often by heart; use more text, or "
            f"--max_iters {twenty} for 20 passes")


def _estimate(cfg: TrainConfig, step: int, s_per_step: float, timed: int) -> str:
    """The estimated time left, from the mean of `timed` steps (an evaluation costs its eval_iters
    forward passes, about a third of a training step each over grad_accum_steps micro-batches)."""
    left = cfg.max_iters - step
    evals = cfg.max_iters // cfg.eval_interval - step // cfg.eval_interval + (cfg.max_iters % cfg.eval_interval > 0)
    seconds = s_per_step * (left + evals * cfg.eval_iters / (3 * cfg.grad_accum_steps))
    return (f"estimated time: ~{_duration(seconds)} for the {left:,} steps left and {evals} evaluation"
            f"{'s' if evals != 1 else ''} ({s_per_step:.3g} s/step over {timed} steps)")


class _LossOf(nn.Module):
    """The training loss as a module's forward, for DistributedDataParallel (whose forward call is what
    arms its gradient all-reduce): forward(x, y[, mask]) -> model.loss(...), a scalar."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self.model, GPT):
            return self.model.loss(x, y, attention_mask=mask)
        return self.model(x, y, attention_mask=mask)[1]


class _NoLock:
    """What ranks other than 0 hold instead of the run folder's lock (rank 0 alone writes the folder)."""

    def release(self) -> None:
        pass


class _NoMetrics:
    """What ranks other than 0 write metrics to: nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


@survives_closed_output  # a reader of the output that left (`| tee`) must not stop a save or the run
def train(cfg: TrainConfig, resume: str | os.PathLike | None = None, overwrite: bool = False,
          stop_at: int | None = None, progress: bool = True, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume from checkpoint or run folder `resume`) the training run cfg describes; see the
    module docstring. stop_at: stop with a checkpoint after this step. ConfigError, DataError and
    CheckpointError for what cannot start; TrainingError for a run that cannot go on. A run already
    finished (resumed, or started again with the config of the run in out_dir) is not trained again:
    the result is read from its last/ checkpoint, with already_finished set.

    Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) the processes train one run together
    (simplegpt.training.distributed, docs/distributed.md): every rank calls train() with the same
    arguments; rank 0 alone prints and writes the run folder, and every rank returns the result.
    resume="auto": cfg.out_dir's last checkpoint when it has one, else a fresh start (for restarts)."""
    if resume == "auto":
        resume = Path(cfg.out_dir) / LAST if run_dir.checkpoint_step(Path(cfg.out_dir) / LAST) is not None else None
    device = resolve_device(cfg.device)
    hardware.configure_backends(device)  # TF32 and SDPA's flash kernel on CUDA; nothing on a CPU
    d = distributed.setup(device, cfg.dist_timeout)
    try:
        return _train(cfg, d, d.device if d else device, resume, overwrite, stop_at, progress, log)
    finally:
        if d is not None:
            d.close()


def _train(cfg: TrainConfig, d: distributed.Dist | None, device: torch.device, resume: str | os.PathLike | None,
           overwrite: bool, stop_at: int | None, progress: bool, log: Callable[[str], None] | None) -> TrainResult:
    from tqdm.auto import tqdm

    main = d is None or d.is_main
    rank, world = (d.rank, d.world_size) if d else (0, 1)
    log = (log or (lambda s: tqdm.write(s))) if main else (lambda s: None)
    progress = progress and main
    t_start = time.perf_counter()
    threads = cfg.num_threads or (distributed.threads_per_rank(d.local_world_size) if d else auto_threads())
    torch.set_num_threads(threads)

    def start() -> tuple:
        """Everything that can fail before step 1 on one rank and not another: every rank runs it, and
        all of them stop when one fails (distributed.agree)."""
        dtype = resolve_dtype(cfg.dtype, device)
        if d is not None:
            distributed.check_accumulation(cfg.grad_accum_steps, world)
            if cfg.cpu_shards > 1:
                raise ConfigError("cpu_shards > 1 cannot run under torchrun: the ranks already split each step, "
                                  "and CoreShards adds its replicas' gradients outside autograd, where DDP's "
                                  "all-reduce never sees them; leave cpu_shards at 0")
            if cfg.parallel == "fsdp" and (why := fsdp.fsdp_unavailable(device)) is not None:
                raise ConfigError(f"parallel = 'fsdp' cannot run here: {why}; use parallel = 'ddp'")
        # CoreShards under DDP: its replicas' gradients are added to the model's .grad by hand, after
        # autograd, so DDP's hooks would all-reduce only the first replica's share: off (1 way).
        n_shards = core_shards(cfg, device, dtype, threads) if d is None else 1
        seed_everything(cfg.seed)
        run_cfg, state, finished, path = cfg, None, None, None
        if resume is not None:
            path = run_dir.checkpoint_dir(resume)
            if sharded and fsdp.is_sharded_checkpoint(path):
                model, tokenizer, state = _load_sharded_resume(path, cfg, device)  # weights: after sharding
            elif sharded:
                raise ConfigError(f"{path} is a single-process (DDP) checkpoint: resume it with parallel = 'ddp'; "
                                  "parallel = 'fsdp' resumes sharded checkpoints (any number of processes)")
            elif fsdp.is_sharded_checkpoint(path):
                raise ConfigError(f"{path} is a sharded (FSDP2) checkpoint: resume it under torchrun with --parallel "
                                  f"fsdp (any number of processes, 1 included: torchrun --nproc_per_node 1 -m "
                                  f"simplegpt train --resume {path} --parallel fsdp); 'simplegpt consolidate {path}' "
                                  "makes a single-process checkpoint of its weights")
            else:
                model, tokenizer, state = load_resume(path, cfg, device)
            out = path.parent
            run_cfg = cfg.replace(out_dir=str(out))
            note = f"resuming {path} at step {state['step']}"
            if state["step"] >= cfg.max_iters:
                finished = _finished_result(path)
        else:
            model, tokenizer, note = init_model(cfg, device)
            out = Path(cfg.out_dir)
            if model is not None:
                run_cfg = cfg.replace(model=model.config, tokenizer=tokenizer.kind)
            if not overwrite and (done := _finished_run(out, run_cfg)) is not None:
                finished = _finished_result(done)
        if finished is None and stop_at is not None and stop_at <= (state["step"] if state else 0):
            raise ConfigError(f"stop_at must be after the starting step {(state or {}).get('step', 0)}")
        lock, created_out, data = _NoLock(), [], None
        if finished is None and main:
            created_out = run_dir.missing_folders(out)
            lock = run_dir.check_out_dir(out, run_cfg, overwrite, resuming=state is not None)  # held to the end
            taken.append((lock, created_out))
            try:
                data = prepare_data(run_cfg, tokenizer, progress)  # before the other ranks read it
            except BaseException:
                run_dir.give_up(lock, created_out)
                raise
        return dtype, n_shards, run_cfg, state, finished, model, tokenizer, note, out, lock, created_out, data, path

    sharded = d is not None and cfg.parallel == "fsdp"  # FSDP2: parameters, gradients, optimizer state split
    taken: list[tuple[Any, bool]] = []  # rank 0's lock, for a run another rank stops before it starts
    try:
        (dtype, n_shards, cfg, state, finished, model, tokenizer, note, out, lock, created_out,
         data, resume_path) = distributed.agree(d, start)
    except distributed.PeerError:
        for held, created in taken:
            run_dir.give_up(held, created)
        raise
    if d is not None and len(set(distributed.gather_objects(d, finished is None))) > 1:
        lock.release()
        raise distributed.PeerError(f"the ranks see different run folders at {out}: the run folder, data and "
                                    "checkpoints must be on a file system that every node shares", quiet=not main)
    if finished is not None:
        return finished

    def data_and_model() -> tuple:
        nonlocal model, tokenizer
        try:
            data_dir, meta = data if data is not None else prepare_data(cfg, tokenizer, False)
            if tokenizer is None:
                tokenizer = load_dataset_tokenizer(data_dir)
            _check_sample_prompt(cfg, tokenizer)
            if model is None:
                if sharded:
                    torch.manual_seed(cfg.seed)  # every rank the same weights: fully_shard keeps each rank's own
                model = GPT(dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"])).to(device)
            if main:
                run_dir.check_disk_space(out, model.num_parameters())
            return data_dir, meta, make_samplers(cfg, data_dir, meta)
        except BaseException:
            if main:
                run_dir.give_up(lock, created_out)  # nothing was trained: leave no empty run folder behind
            raise

    try:
        data_dir, meta, (train_sampler, val_sampler) = distributed.agree(d, data_and_model)
    except distributed.PeerError:
        if main:
            run_dir.give_up(lock, created_out)
        raise
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if sharded:
        # fully_shard per block, then the root; PyTorch's AdamW (the CPU kernels' one takes no DTensors)
        fsdp.shard_model(model, mp_policy=dtype if dtype != torch.float32 else None)
        optimizer = make_optimizer(model, cfg.replace(fused=cfg.fused and device.type != "cpu"), device, scaler)
    else:
        optimizer = make_optimizer(model, cfg, device, scaler)
    step, tokens_seen, best_val, elapsed_before = 0, 0, math.inf, 0.0
    if state is not None and sharded:
        try:  # collective: each rank reads its part, whatever world size saved it
            fsdp.load_sharded(resume_path, model, optimizer)
        except CheckpointError:
            raise
        except Exception as e:
            raise distributed.lost_peer(d, e) from None
    if state is not None:
        _restore(optimizer if not sharded else None, scaler, train_sampler, state, resume_path)
        step, tokens_seen = state["step"], state["tokens_seen"]
        best_val, elapsed_before = state["best_val_loss"], state["elapsed_s"]
        ranks = state.get("rng_ranks") or [state["rng"]]
        if rank < len(ranks):
            set_rng_state(ranks[rank])
        else:  # a rank the saved run did not have (resumed on more processes): a stream of its own
            set_rng_state(state["rng"])
            torch.manual_seed(_rank_seed(cfg.seed, rank, step))
    elif rank:
        torch.manual_seed(_rank_seed(cfg.seed, rank, 0))  # its own dropout stream; the weights are rank 0's
    if main:
        run_dir.write_config(out, cfg)
        metrics: Any = run_dir.Metrics(out, keep_until=step if state is not None else None,
                                       tensorboard=cfg.tensorboard)
    else:
        metrics = _NoMetrics()

    # The batches hold ids of the model's own tokenizer (prepare_data checked) in windows of block_size <=
    # n_positions (the config checked): no step needs the forward's input check and its host sync.
    model.check_inputs = False
    # The module the steps run: compiled, or with the CPU training kernels on modules sharing the parameters.
    step_model = torch.compile(model) if cfg.compile else model if sharded else cpu.for_training(model)
    step_model.train()  # before CoreShards copies it
    ddp = runner = None
    if sharded:
        runner = _LossOf(step_model)  # FSDP2's hooks in the sharded model's modules do the collectives
    elif d is not None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP over the kernels' view: the same Parameter objects, and their gradients pass through autograd's
        # AccumulateGrad (the kernels are autograd Functions), where DDP's all-reduce hooks sit.
        inner = model if cfg.compile else step_model
        try:
            ddp = DDP(_LossOf(inner), device_ids=[device.index] if device.type == "cuda" else None)
        except Exception as e:
            raise distributed.lost_peer(d, e) from None
        runner = torch.compile(ddp) if cfg.compile else ddp
        if cfg.compile:
            step_model = model  # evaluation: the plain model (the compiled module is DDP's)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * cfg.block_size
    flops_peak, peak_basis = device_peak_flops(cfg, device, threads) if main else (1.0, "")
    if flops_peak is not None:
        flops_peak *= world  # the run's peak: every rank's devices
    flops_per_token = model.flops_per_token(cfg.block_size)  # once: counting parameters walks the model
    bytes_per_token = meta["val_bytes_per_token"]
    dataset_info = {k: meta[k] for k in ("source", "tokens", "vocab_size", "val_bytes_per_token")}
    dataset_info["dir"] = str(data_dir)
    if note:
        log(note)
    if d is None and cfg.parallel == "fsdp":
        log("note: parallel = 'fsdp' applies under torchrun (torchrun --nproc_per_node N -m simplegpt train ...); "
            "this run is one process and saves a plain checkpoint")
    shards = CoreShards(step_model, n_shards) if n_shards > 1 else None
    processes = f"{world} process{'es' if world != 1 else ''}"
    procs = (f"; {processes} ({'FSDP2' if sharded else 'DDP'} over {d.backend}, "
             f"{cfg.grad_accum_steps // world} of the "
             f"{cfg.grad_accum_steps} micro-batches of a step each)" if d else "")
    log(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {cfg.n_layer} layers, {cfg.n_embd} wide, "
        f"block {cfg.block_size}; data: {data_dir} ({meta['tokens']['train']:,} train tokens); device: {device}, "
        f"{str(dtype).removeprefix('torch.')}, {threads} thread{'s' if threads != 1 else ''}"
        f"{' per process' if d else ''}{f' (each batch split {n_shards} ways)' if shards else ''}{procs}; "
        f"run folder: {out}")
    log(f"MFU (model FLOPs utilization) is against {peak_basis}{f' x {processes}' if d else ''}")
    if (warning := _repeat_warning(cfg, step, tokens_per_step, meta["tokens"]["train"])) is not None:
        log(warning)
    if (warning := long_warmup_warning(cfg)) is not None:
        log(warning)
    if sharded and cfg.sample_tokens:
        log("samples: not drawn under FSDP2 (a forward pass of the sharded model needs every rank); "
            "consolidate a checkpoint and use simplegpt generate")

    def save(name: str, val_loss: float | None, with_state: bool) -> Path | None:
        """Rank 0 writes the checkpoint; a collective when with_state (every rank's RNG state is in it)."""
        rngs = distributed.gather_objects(d, rng_state()) if d is not None and with_state else None
        opt = optimizer if with_state else None
        if not main:
            if sharded:  # into rank 0's temporary directory, before its atomic swap
                fsdp.save_sharded(distributed.broadcast_object(d, None), model, opt)
            return None

        def write_sharded(tmp: Path) -> None:
            distributed.broadcast_object(d, tmp)
            fsdp.save_sharded(tmp, model, opt)

        metadata = {"train_config": cfg.to_dict(), "step": step, "tokens_seen": tokens_seen,
                    "metrics": {"val_loss": val_loss, "val_bpb": bpb(val_loss), "best_val_loss": best_val},
                    "dataset": dataset_info}
        train_state = None
        if with_state:
            train_state = {"step": step, "tokens_seen": tokens_seen, "scaler": scaler.state_dict(),
                           "sampler": train_sampler.state_dict(), "rng": rng_state(),
                           "best_val_loss": best_val, "elapsed_s": elapsed_before + time.perf_counter() - t_start}
            # a sharded run's optimizer state is in dcp/, each rank's part (the field is kept, empty, for
            # the readers that check a train state's fields)
            train_state["optimizer"] = ({"state": {}, "param_groups": [], "in": fsdp.DCP_DIR} if sharded
                                        else optimizer.state_dict())
            if rngs is not None:
                train_state["rng_ranks"] = rngs
        return ckpt.save_checkpoint(out / name, model, tokenizer, metadata=metadata, train_state=train_state,
                                    write_weights=write_sharded if sharded else None)

    def bpb(loss: float | None) -> float | None:
        return None if loss is None else loss / (math.log(2) * bytes_per_token)

    def micro_steps() -> float:
        """Forward and backward of this rank's micro-batches of a step; this rank's part of the step's loss.

        The step's loss is the mean over all the loss tokens of its micro-batches (of all ranks): each
        micro-batch's mean loss weighs by its share of those tokens, so a padded micro-batch of short
        rows counts as its tokens, and batch_size x grad_accum_steps splits of the same rows give the same
        loss and gradients. Every rank draws every micro-batch of the step, so each knows the step's
        token count without a collective."""
        batches = [train_sampler.next_batch() for _ in range(cfg.grad_accum_steps)]
        counts = [loss_tokens(batch) for batch in batches]
        step_tokens = sum(counts)
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            weight = counts[i] / step_tokens
            if shards is not None:
                torch.set_num_threads(1)  # one core per share of the batch
                loss_sum += shards.forward_backward(batch, weight) * weight
                continue
            if runner is not None:
                if i % world != rank:
                    continue  # another rank's micro-batch
                # Only the rank's last micro-batch of the step all-reduces the gradients.
                last = i + world >= cfg.grad_accum_steps
                if sharded:
                    model.set_requires_gradient_sync(last)  # FSDP2's no_sync
                with contextlib.nullcontext() if last or sharded else ddp.no_sync():
                    x, y, *mask = (t.to(device, non_blocking=True) for t in batch)
                    with autocast:
                        loss = runner(x, y, mask[0] if mask else None)
                    loss_sum += float(loss.detach()) * weight
                    # DDP and FSDP2 average the gradients over the N ranks: N x weight makes it the weighted sum.
                    scaler.scale(loss * (world * weight)).backward()
                continue
            loss = _forward(step_model, batch, device, autocast)
            loss_sum += float(loss.detach()) * weight
            scaler.scale(loss * weight).backward()
        return loss_sum

    result = TrainResult(out_dir=out, step=step, tokens_seen=tokens_seen, elapsed_s=0.0,
                         best_val_loss=best_val if math.isfinite(best_val) else None)
    # A bar on a terminal; elsewhere (a pipe, a log file) a plain line now and then, not a stream of \r updates.
    lines = progress and not sys.stderr.isatty()
    bar = tqdm(total=cfg.max_iters, initial=step, disable=not progress or lines, unit="step", dynamic_ncols=True)
    t_last, window_tokens = time.perf_counter(), 0
    t_line = t_last - LINE_EVERY_S
    timed, timed_s = -1, 0.0  # steps timed for the estimate (the first warms up), and their seconds
    try:
        with _StopSignals(keep=d is not None) as signals, keep_freed_memory(device.type == "cpu"):
            while step < cfg.max_iters:
                t_step = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with distributed.collectives(d):  # a peer lost in DDP's all-reduce: one line
                    loss_sum = micro_steps()
                received = signals.received
                if d is not None:  # the step's loss over all ranks, and whether any rank was asked to stop
                    loss_sum, sigint, sigterm = distributed.all_reduce_sum(
                        d, [loss_sum, received == "SIGINT", received == "SIGTERM"], device)
                    received = "SIGINT" if sigint else "SIGTERM" if sigterm else None
                step_loss = loss_sum
                if not math.isfinite(step_loss):
                    raise TrainingError(
                        f"the loss became {step_loss} at step {step + 1} (lr {lr:.3g}); the run stopped and "
                        f"{_last_good(out)}; lower --lr or set --grad_clip")
                # On torch's current thread count: 1 in a split step, where a second OpenMP thread would
                # spin on the core that the next step's other share needs (measured 15% slower steps).
                grad_norm = optimizer.clip_and_step(cfg.grad_clip)
                if cfg.grad_clip > 0 and not math.isfinite(grad_norm) and not scaler.is_enabled():
                    # the optimizer did not apply it (under fp16 the scaler skips such steps by design)
                    raise TrainingError(
                        f"the gradient norm became {grad_norm} at step {step + 1} (lr {lr:.3g}); the step was not "
                        f"applied, the run stopped and {_last_good(out)}; lower --lr")
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += tokens_per_step
                window_tokens += tokens_per_step
                result.losses.append(step_loss)

                now = time.perf_counter()
                tok_s = window_tokens / max(now - t_last, 1e-9)
                step_mfu = mfu(flops_per_token, tok_s, flops_peak)  # None on a GPU of unknown peak
                if 0 <= timed:
                    timed, timed_s = timed + 1, timed_s + now - t_step
                    if timed >= ESTIMATE_STEPS or timed_s >= ESTIMATE_S:
                        log(_estimate(cfg, step, timed_s / timed, timed))
                        timed = -2  # said once
                elif timed == -1:
                    timed = 0
                stop = received or ("stop_at" if stop_at is not None and step >= stop_at else None)
                if step % cfg.log_interval == 0 or step == cfg.max_iters or stop:
                    metrics.write({"kind": "train", "step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                                   "tokens": tokens_seen, "tok_per_s": tok_s, "mfu": step_mfu,
                                   "time_s": elapsed_before + now - t_start})
                    t_last, window_tokens = now, 0
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tok_s:,.0f}", mfu=format_mfu(step_mfu),
                                refresh=False)
                bar.update(1)
                if lines and (step % cfg.log_interval == 0 and now - t_line >= LINE_EVERY_S or step == cfg.max_iters):
                    t_line = now
                    print(f"step {step:,}/{cfg.max_iters:,}  loss {step_loss:.4f}  {tok_s:,.0f} tok/s  "
                          f"MFU {format_mfu(step_mfu)}  "
                          f"{_duration(elapsed_before + now - t_start)} elapsed", file=sys.stderr, flush=True)

                if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                    torch.set_num_threads(threads)
                    # Evaluation and sampling use their own RNG, so they never change the training stream.
                    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                        val_sum, val_tokens = _eval_sum(step_model, val_sampler, cfg.eval_iters, device, autocast,
                                                        rank, world, same_count=sharded)
                    if d is not None:  # each rank evaluated its share of the same eval_iters batches
                        val_sum, val_tokens = distributed.all_reduce_sum(d, [val_sum, val_tokens], device)
                    val_loss = val_sum / val_tokens
                    if not math.isfinite(val_loss):
                        raise TrainingError(
                            f"the validation loss became {val_loss} at step {step}; the run stopped and "
                            f"{_last_good(out)}; lower --lr or set --grad_clip")
                    result.val_loss, result.val_bpb = val_loss, bpb(val_loss)
                    metrics.write({"kind": "eval", "step": step, "val_loss": val_loss, "val_bpb": bpb(val_loss),
                                   "tokens": tokens_seen})
                    log(f"step {step}: val loss {val_loss:.4f}, {bpb(val_loss):.3f} bits/byte")
                    # The checkpoints first: nothing optional (the sample) can lose the steps done.
                    if val_loss < best_val:
                        best_val = val_loss
                        save(BEST, val_loss, with_state=False)
                    save(LAST, val_loss, with_state=True)
                    if cfg.sample_tokens and main and not sharded:
                        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                            sample = sample_text(model, tokenizer, cfg.sample_prompt, cfg.sample_tokens, device,
                                                 cfg.seed)
                        if sample:
                            log(f"--- sample at step {step} ---\n{sample}\n---")
                            run_dir.append_sample(out, step, val_loss, sample)
                    distributed.barrier(d)  # the other ranks wait here while rank 0 saves and samples
                    t_last, window_tokens = time.perf_counter(), 0  # eval time is not training speed

                if d is None:
                    stop = stop or signals.received  # one during the evaluation (under torchrun: at the next step)
                if stop and step < cfg.max_iters:
                    if step % cfg.eval_interval:
                        save(LAST, None, with_state=True)
                        distributed.barrier(d)
                    result.interrupted = stop
                    # a sharded checkpoint resumes only under torchrun (any number of processes)
                    again = (f"torchrun --nproc_per_node {world} -m simplegpt train" if sharded
                             else "simplegpt train")
                    log(f"stopped at step {step} ({stop}); checkpoint saved to {out / LAST}; "
                        f"continue with: {again} --resume {out / LAST}")
                    break
    except OSError as e:  # a full disk, or a file of the run folder that cannot be written
        if (failure := run_dir.write_failure(out, e, step)) is None:
            raise
        raise failure from None
    finally:
        bar.close()
        metrics.close()
        lock.release()
        if shards is not None:
            shards.close()
            torch.set_num_threads(threads)
    result.step, result.tokens_seen = step, tokens_seen
    result.best_val_loss = best_val if math.isfinite(best_val) else None
    result.elapsed_s = elapsed_before + time.perf_counter() - t_start
    if cfg.plot and result.interrupted is None and main:
        try:
            png = run_dir.plot_losses(out)
            log(f"loss curve: {png}" if png else
                'loss curve: not drawn, matplotlib is not installed (pip install "simplegpt-toolkit[plot]")')
        except OSError as e:  # the run is saved: a picture that cannot be written does not fail it
            log(f"loss curve: not drawn ({e.strerror or e})")
    if cfg.plot and main:
        try:  # the run is saved by now: a report that cannot be drawn must not turn it into a failure
            from ..report import write_report

            log(f"report: {write_report(out)}")
        except Exception as e:
            log(f"report: not written ({type(e).__name__}: {e}); try again with: simplegpt report {out}")
    return result


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of rank > 0's own random stream (dropout), from the run's seed, the rank and the
    step it starts at."""
    return (seed * 1_000_003 + rank * 7919 + step) % 2**63


def _restore(optimizer: Any, scaler: Any, sampler: Any, state: dict[str, Any], path: Path) -> None:
    """Load the optimizer's (None: loaded with the sharded weights), the loss scaler's and the
    sampler's state from a checkpoint's train state; CheckpointError naming the file for one that
    does not fit them (load_train_state checked its fields, not everything they hold)."""
    parts = [("optimizer", optimizer), ("scaler", scaler), ("sampler", sampler)]  # the global sampler: same on every rank
    for key, target in parts:
        if target is None:
            continue
        try:
            target.load_state_dict(state[key])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path / ckpt.TRAIN_STATE_FILE} is damaged: its {key} state cannot be restored "
                                  f"({detail}); use another checkpoint") from None


def _load_sharded_resume(path: Path, cfg: TrainConfig, device: torch.device) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """For a sharded (FSDP2) checkpoint: a model of its config (its weights come with fsdp.load_sharded
    once it is sharded), its tokenizer and train state. ConfigError / CheckpointError as load_resume."""
    from ..tokenizer import load_tokenizer

    info = ckpt.describe_checkpoint(path)  # its config checked against the shapes in dcp/.metadata
    check_resume_compatible(info.metadata.get("train_config", {}), cfg, path)
    try:
        tokenizer = load_tokenizer(path / ckpt.TOKENIZER_DIR)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} has no readable tokenizer ({e}); it cannot be resumed") from None
    return GPT(info.config).to(device), tokenizer, ckpt.load_train_state(path)

