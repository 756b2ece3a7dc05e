"""The training loop: data, model, AdamW, LR schedule, eval, samples, checkpoints, exact resume.

`train(cfg)` runs a whole TrainConfig and returns a TrainResult. A run folder holds
config.toml (the effective config), metrics.jsonl, samples.txt, last/ (with the full train state
for `--resume`), best/ (lowest val loss) and loss.png. Resuming restores model, optimizer,
step, sampler and every RNG, so the per-step losses equal an uninterrupted run's bit for bit
on CPU. Ctrl-C / SIGTERM finish the current step, save last/ and return; a non-finite loss
stops the run before the optimizer step, so last/ stays the last good state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .config import TrainConfig, to_toml
from .data import PackedSampler, PaddedSampler, TokenShards, load_dataset_tokenizer, prepare_corpus, read_meta
from .cpu_memory import keep_freed_memory
from .cpu_parallel import CoreShards
from .devices import resolve_device
from .errors import CheckpointError, ConfigError, DataError, SimpleGPTError
from .model import GPT, GPTConfig
from .accel import cpu
from .accel.cpu import training as native_training
from .tokenizer import Tokenizer

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.txt"
LAST, BEST = "last", "best"
MODEL_SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "bias")
# Peak dense bf16 FLOP/s of common GPUs, for MFU (the numbers of nanoGPT / the vendor sheets).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
                  "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


class TrainingError(SimpleGPTError):
    """Training cannot go on (non-finite loss, no space left)."""


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine / wsd / constant;
    the last step (max_iters - 1) runs at min_lr."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(cfg.max_iters * cfg.decay_fraction))
        decay_start = max(cfg.warmup_iters, cfg.max_iters - decay_steps)
        if step < decay_start:
            return cfg.lr
        frac = min(1.0, (step - decay_start) / max(1, cfg.max_iters - 1 - decay_start))
        return cfg.lr + frac * (cfg.min_lr - cfg.lr)
    frac = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - 1 - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool) -> list[dict]:
    """Decay only matrices of Linear layers (and embeddings if asked); never biases or norms."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        is_embedding = id(p) in embeddings
        (decay if p.dim() >= 2 and (decay_embeddings or not is_embedding) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if cfg.fused and device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass  # this torch build has no fused kernel for the device
    return torch.optim.AdamW(groups, **kwargs)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError("dtype float16 needs a CUDA device (loss scaling); use bfloat16 or float32")
    return dtype


def peak_flops(cfg: TrainConfig, device: torch.device) -> float:
    """The FLOP/s MFU divides by: configured, a known GPU's bf16 peak, or a measured CPU matmul rate."""
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
        return 100e12
    # CPU: the rate of a large float32 matmul on this machine now, a practical ceiling: the best of
    # short rounds over a fifth of a second, so that a moment of load from elsewhere does not set it
    a = torch.randn(512, 512)
    torch.mm(a, a)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, a)
        best = max(best, 4 * 2 * 512**3 / (time.perf_counter() - t0))
    return best


def auto_threads() -> int:
    """CPU threads for torch: the cores this process may use that other processes leave idle.

    OpenMP threads that outnumber the free cores spin against each other: on a 2-core machine
    with one other busy process, 2 threads train ~7x slower than 1 (measured, docs/training.md).
    Idle cores are measured over a fifth of a second (/proc/stat on Linux); the load average
    is the fallback, though it lags: it still counts a job that ended a minute ago.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = _busy_cores(0.2)
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.75)))


def core_shards(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, threads: int) -> int:
    """How many ways CoreShards splits each batch (1 = not at all); ConfigError for a cpu_shards that
    cannot apply. Auto (0) shards fp32 CPU runs without dropout or torch.compile: one share per
    thread, at most one per sequence of the batch."""
    fits = device.type == "cpu" and dtype == torch.float32 and not cfg.compile and cfg.dropout == 0.0
    if cfg.cpu_shards == 0:
        return min(threads, cfg.batch_size) if fits else 1
    if cfg.cpu_shards > 1 and not fits:
        raise ConfigError("cpu_shards > 1 needs float32 training on the CPU without dropout or compile "
                          "(dropout draws from one random stream, which threads would share out of order)")
    if cfg.cpu_shards > cfg.batch_size:
        raise ConfigError(f"cpu_shards ({cfg.cpu_shards}) cannot exceed batch_size ({cfg.batch_size})")
    return cfg.cpu_shards


def _busy_cores(seconds: float) -> float | None:
    """How many cores were busy (machine-wide) over the next `seconds`, or None where unknown."""

    def read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle  # user..steal; guest time is already counted in user

    first = read()
    if first is None:
        return None
    time.sleep(seconds)
    second = read()
    if second is None:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return None
    return (os.cpu_count() or 1) * (total - idle) / total


def _slug(source: str) -> str:
    name = Path(source.rstrip("/")).stem if "://" not in source else Path(source).stem
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "corpus"


def _is_dataset_dir(path: str) -> bool:
    return bool(path) and (Path(path) / "meta.json").is_file()


def dataset_dir(cfg: TrainConfig) -> Path:
    """Where cfg's prepared dataset lives: data itself when it is one, else data_dir or a default."""
    if _is_dataset_dir(cfg.data):
        return Path(cfg.data)
    if cfg.data_dir:
        return Path(cfg.data_dir)
    return Path("data") / f"{_slug(cfg.data.removeprefix('hf:'))}_{cfg.tokenizer}"


def prepare_data(cfg: TrainConfig, tokenizer: Tokenizer | None, progress: bool) -> tuple[Path, dict]:
    """Prepare cfg.data if needed (with a fixed tokenizer when fine-tuning / resuming)."""
    if not cfg.data or not cfg.data.strip():
        raise DataError("no corpus given: set data (--data) to a file, folder, glob, URL or 'shakespeare'")
    out = dataset_dir(cfg)
    if _is_dataset_dir(cfg.data):
        meta = read_meta(out)
    else:
        meta = prepare_corpus(cfg.data, out, tokenizer or cfg.tokenizer, val_fraction=cfg.val_fraction,
                              text_field=cfg.text_field, progress=progress)
    if tokenizer is not None and meta["tokenizer"] != tokenizer.spec():
        raise DataError(f"the dataset in {out} was prepared with a different tokenizer ({meta['tokenizer']['type']}, "
                        f"vocab {meta['vocab_size']}) than the model's ({tokenizer.kind}, vocab {tokenizer.vocab_size}); "
                        "use another data_dir or prepare it from the same tokenizer")
    return out, meta


def _check_out_dir(out: Path, cfg: TrainConfig, overwrite: bool, resuming: bool) -> None:
    """Refuse a folder that holds another run or other files; check it is writable and has space."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (resuming or overwrite):
        saved = out / CONFIG_FILE
        if not saved.is_file():
            raise ConfigError(f"out_dir {out} is not empty and holds no simplegpt run; choose another out_dir "
                              "or pass --overwrite")
        from .config import read_toml

        try:
            same = read_toml(saved) == cfg.to_dict()
        except ConfigError:
            same = False
        if not same:
            raise ConfigError(f"out_dir {out} already holds a different run; pass --overwrite to replace it, "
                              f"--resume {out / LAST} to continue it, or choose another out_dir")
        step = _checkpoint_step(out / LAST)
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


def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(ckpt.read_checkpoint_config(path).get("step"))
    except (CheckpointError, TypeError, ValueError):
        return None


def _check_disk_space(out: Path, model: GPT) -> None:
    # last/ holds weights + 2 AdamW moments, best/ the weights; during a save one more copy exists.
    need = model.num_parameters() * 4 * (3 + 1 + 3) + (16 << 20)
    free = shutil.disk_usage(out).free
    if free < need:
        raise TrainingError(f"not enough disk space in {out}: checkpoints need ~{need / 2**20:.0f} MiB, "
                            f"{free / 2**20:.0f} MiB free; free some space or choose another out_dir")


def _set_dropout(model: GPT, p: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = p
    model.config = GPTConfig(**{**model.config.to_dict(), "dropout": p})


def init_model(cfg: TrainConfig, device: torch.device) -> tuple[GPT | None, Tokenizer | None, str]:
    """For init_from: the loaded model, its tokenizer and a log line; (None, None, "") otherwise."""
    if not cfg.init_from:
        return None, None, ""
    src = Path(cfg.init_from)
    if (src / ckpt.CONFIG_FILE).is_file() and _is_simplegpt_checkpoint(src):
        loaded = ckpt.load_checkpoint(src, device="cpu")
    else:
        try:
            from .hf import load_hf_model
        except ImportError as e:
            raise CheckpointError(f"init_from {cfg.init_from!r} is not a simplegpt checkpoint and Hugging Face "
                                  f"import is unavailable ({e})") from None
        loaded = load_hf_model(cfg.init_from)
    if loaded.tokenizer is None:
        raise CheckpointError(f"{cfg.init_from} has no tokenizer; it cannot be fine-tuned on text")
    model = loaded.model
    if cfg.block_size > model.config.n_positions:
        raise ConfigError(f"block_size {cfg.block_size} exceeds the n_positions {model.config.n_positions} of "
                          f"{cfg.init_from}; use --block_size {model.config.n_positions} or less")
    if cfg.block_size < model.config.n_positions:
        model.crop_block_size(cfg.block_size)
    _set_dropout(model, cfg.dropout)
    return model.to(device), loaded.tokenizer, f"initialized from {cfg.init_from}"


def _is_simplegpt_checkpoint(path: Path) -> bool:
    try:
        ckpt.read_checkpoint_config(path)
        return True
    except CheckpointError:
        return False


def _model_fields_from(model: GPT) -> dict[str, Any]:
    c = model.config
    return dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions, bias=c.bias)


class _StopSignals:
    """Turns the first SIGINT/SIGTERM into a flag checked between steps; a second one interrupts."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if sys.platform != "win32" and threading_main():
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


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _Metrics:
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


def _samplers(cfg: TrainConfig, data_dir: Path, meta: dict) -> tuple[Any, Callable[[], Any]]:
    """The train sampler and a factory of the (always identical) validation sampler."""
    train_shards, val_shards = TokenShards(data_dir, "train"), TokenShards(data_dir, "val")
    if cfg.batch_mode == "padded":
        train = PaddedSampler.from_shards(train_shards, meta["eos_id"], cfg.block_size, cfg.batch_size, cfg.seed)
        val = lambda: PaddedSampler.from_shards(val_shards, meta["eos_id"], cfg.block_size,  # noqa: E731
                                                cfg.batch_size, cfg.seed + 1)
    else:
        for name, shards in (("train", train_shards), ("validation", val_shards)):
            if shards.num_tokens <= cfg.block_size:
                raise DataError(f"the corpus is too small: its {name} split has {shards.num_tokens} tokens, fewer "
                                f"than block_size + 1 = {cfg.block_size + 1}; use a smaller --block_size or more text")
        train = PackedSampler(train_shards, cfg.block_size, cfg.batch_size, cfg.seed)
        val = lambda: PackedSampler(val_shards, cfg.block_size, cfg.batch_size, cfg.seed + 1)  # noqa: E731
    return train, val


def _forward(model: nn.Module, batch: tuple, device: torch.device, autocast: Any) -> torch.Tensor:
    x, y, *mask = (t.to(device, non_blocking=True) for t in batch)
    with autocast:
        if isinstance(model, GPT):  # not a compiled wrapper: GPT.loss may take its native path
            return model.loss(x, y, attention_mask=mask[0] if mask else None)
        _, loss = model(x, y, attention_mask=mask[0] if mask else None)
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, make_sampler: Callable[[], Any], iters: int, device: torch.device,
             autocast: Any) -> float:
    """Mean val loss over the same `iters` batches every time."""
    model.eval()
    sampler = make_sampler()
    losses = [float(_forward(model, sampler.next_batch(), device, autocast)) for _ in range(iters)]
    model.train()
    return sum(losses) / len(losses)


def sample_text(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, device: torch.device,
                seed: int) -> str:
    """A sample for people to read at eval time (temperature 0.8, top-k 50, seeded); ends at EOS."""
    from .engine import Engine, SamplingParams

    ids = (tokenizer.encode(prompt) if prompt else [tokenizer.eos_id])[-model.config.n_positions:]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=seed)
    # gemv_layout=False: the weights keep their layout, so training goes on bit for bit as a resumed run would.
    engine = Engine(model, tokenizer, device=device, gemv_layout=False)
    [result] = engine.generate([ids], params)
    model.train()
    return prompt + result.text


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
    path = out / "loss.png"
    tmp = out / ".loss.tmp.png"
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_resume_compatible(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    """Refuse overrides that change the model's shape or tokenizer of a run being resumed."""
    for key in (*MODEL_SHAPE, "tokenizer"):
        if key in saved and saved[key] != getattr(cfg, key):
            raise ConfigError(f"cannot resume {path} with {key}={getattr(cfg, key)!r}: the checkpoint has "
                              f"{key}={saved[key]!r}; drop that override, or start a new run with --init-from {path}")


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None, overwrite: bool = False,
          stop_at: int | None = None, progress: bool = True, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume) a training run described by cfg; see the module docstring."""
    from tqdm.auto import tqdm

    log = log or (lambda s: tqdm.write(s))
    t_start = time.perf_counter()
    threads = cfg.num_threads or auto_threads()
    torch.set_num_threads(threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    n_shards = core_shards(cfg, device, dtype, threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)

    state: dict[str, Any] | None = None
    if resume is not None:
        resume = Path(resume)
        if (resume / LAST).is_dir() and not (resume / ckpt.CONFIG_FILE).is_file():
            resume = resume / LAST  # the run folder was given
        loaded = ckpt.load_checkpoint(resume, device="cpu")
        state = ckpt.load_train_state(resume)
        check_resume_compatible(loaded.metadata.get("train_config", {}), cfg, resume)
        if loaded.tokenizer is None:
            raise CheckpointError(f"{resume} has no tokenizer; it cannot be resumed")
        model, tokenizer = loaded.model.to(device), loaded.tokenizer
        out = resume.parent
        cfg = cfg.replace(out_dir=str(out))
        note = f"resuming {resume} at step {state['step']}"
    else:
        model, tokenizer, note = init_model(cfg, device)
        out = Path(cfg.out_dir)
        if model is not None:
            cfg = cfg.replace(**_model_fields_from(model), tokenizer=tokenizer.kind)
    if stop_at is not None and stop_at <= (state["step"] if state else 0):
        raise ConfigError(f"stop_at must be after the starting step {(state or {}).get('step', 0)}")

    created_out = not out.exists()
    _check_out_dir(out, cfg, overwrite, resuming=state is not None)
    try:
        data_dir, meta = prepare_data(cfg, tokenizer, progress)
        if tokenizer is None:
            tokenizer = load_dataset_tokenizer(data_dir)
        if model is None:
            model = GPT(GPTConfig(vocab_size=meta["vocab_size"], n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                  n_layer=cfg.n_layer, n_head=cfg.n_head, dropout=cfg.dropout,
                                  bias=cfg.bias)).to(device)
        _check_disk_space(out, model)
        train_sampler, val_sampler = _samplers(cfg, data_dir, meta)
    except BaseException:
        if created_out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # nothing was trained: leave no empty run folder behind
        raise
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step, tokens_seen, best_val, elapsed_before = 0, 0, math.inf, 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        train_sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        best_val, elapsed_before = state["best_val_loss"], state["elapsed_s"]
    (out / CONFIG_FILE).write_text(to_toml(cfg), encoding="utf-8")
    metrics = _Metrics(out, keep_until=step if state is not None else None, tensorboard=cfg.tensorboard)

    raw_model = model
    # The module the steps run: compiled, or with the CPU training kernels on modules sharing the parameters.
    model = torch.compile(model) if cfg.compile else cpu.for_training(model)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * cfg.block_size
    flops_peak = peak_flops(cfg, device)
    flops_per_token = raw_model.flops_per_token(cfg.block_size)  # once: counting parameters walks the model
    bytes_per_token = meta["val_bytes_per_token"]
    dataset_info = {k: meta[k] for k in ("source", "tokens", "vocab_size", "val_bytes_per_token")}
    dataset_info["dir"] = str(data_dir)
    if note:
        log(note)
    shards = CoreShards(model, n_shards) if n_shards > 1 else None
    log(f"model: {raw_model.num_parameters() / 1e6:.2f}M parameters, {cfg.n_layer} layers, {cfg.n_embd} wide, "
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
                           "scaler": scaler.state_dict(), "sampler": train_sampler.state_dict(), "rng": _rng_state(),
                           "best_val_loss": best_val, "elapsed_s": elapsed_before + time.perf_counter() - t_start}
        return ckpt.save_checkpoint(out / name, raw_model, tokenizer, metadata=metadata, train_state=train_state)

    def bpb(loss: float | None) -> float | None:
        return None if loss is None else loss / (math.log(2) * bytes_per_token)

    result = TrainResult(out_dir=out, step=step, tokens_seen=tokens_seen, elapsed_s=0.0,
                         best_val_loss=best_val if math.isfinite(best_val) else None)
    model.train()
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
                    loss = _forward(model, train_sampler.next_batch(), device, autocast)
                    loss_sum += float(loss.detach())
                    scaler.scale(loss / cfg.grad_accum_steps).backward()
                step_loss = loss_sum / cfg.grad_accum_steps
                if not math.isfinite(step_loss):
                    raise TrainingError(
                        f"the loss became {step_loss} at step {step + 1} (lr {lr:.3g}); the run stopped and "
                        f"{out / LAST} keeps the last good state; lower --lr or set --grad_clip")
                # CPU fp32: clipping and AdamW in two native passes, else PyTorch's ops. On torch's current
                # thread count: 1 in a split step, where a second OpenMP thread would spin on the core
                # that the next step's other share needs (measured 15% slower steps).
                native_norm = (native_training.adamw_step(optimizer, cfg.grad_clip, torch.get_num_threads())
                               if cfg.fused and not scaler.is_enabled() else None)
                if native_norm is not None:
                    grad_norm = native_norm
                else:
                    grad_norm = math.nan
                    if cfg.grad_clip > 0:
                        scaler.unscale_(optimizer)
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip))
                    scaler.step(optimizer)
                    scaler.update()
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
                        val_loss = evaluate(model, val_sampler, cfg.eval_iters, device, autocast)
                        sample = (sample_text(raw_model, tokenizer, cfg.sample_prompt, cfg.sample_tokens, device,
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
                        with open(out / SAMPLES_FILE, "a", encoding="utf-8") as f:
                            f.write(f"=== step {step}, val loss {val_loss:.4f} ===\n{sample}\n\n")
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
        png = plot_losses(out)
        log(f"loss curve: {png}" if png else
            'loss curve: not drawn, matplotlib is not installed (pip install "simplegpt[plot]")')
    return result
