"""The setup of a training run, as named steps that each return a named object:

    begin(cfg, way, ...)       -> Start     the run folder, where the weights start, rank 0's prepared data
    load_data(start, way)      -> Data      the dataset, its samplers, the tokenizer and the model
    prepare(start, data, way)  -> Training  the wrapped model, the optimizer, the state a resume restores

Everything that can fail on one rank and not another runs inside way.agree: when one rank cannot
start, every rank stops, and only the failing one says why. Everything that can be checked is
checked here, before step 1 (the sample prompt against the tokenizer included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import TrainConfig
from ..data.shards import load_dataset_tokenizer
from ..errors import ConfigError
from ..model import GPT
from ..tokenizer import TOKENIZER_TYPES, Tokenizer
from . import lora, run_dir
from .dataset import make_samplers, prepare_data
from .hardware import resolve_dtype
from .loss import make_loss
from .result import TrainResult, finished_result, finished_run
from .sft import load_sft
from .start import init_model, rng_state, seed_everything, set_rng_state
from .ways.base import Compute, WayOfRunning, restore_part


@dataclass
class Start:
    """Where a run starts. cfg: the run's config (a resumed run's out_dir, an init_from model's shape);
    state: the train state of the checkpoint at resume_path being resumed; model/tokenizer: loaded
    ones (None: made from the data); finished: the result of a run that had already finished (nothing
    else is set up). lock, created and data are rank 0's: the run folder's lock, the folders it made,
    the prepared (data_dir, meta)."""

    cfg: TrainConfig
    out: Path
    dtype: torch.dtype
    resume_path: Path | None
    state: dict[str, Any] | None
    model: GPT | None
    tokenizer: Tokenizer | None
    note: str
    lock: Any
    created: list[Path]
    data: tuple[Path, dict] | None
    finished: TrainResult | None

    def give_up(self) -> None:
        """Nothing was trained: release the run folder and leave no empty one behind (rank 0)."""
        run_dir.give_up(self.lock, self.created)


class _NoLock:
    """What ranks other than 0 hold instead of the run folder's lock (rank 0 alone writes the folder)."""

    def release(self) -> None:
        pass


def begin(cfg: TrainConfig, way: WayOfRunning, resume: Path | str | None, overwrite: bool, stop_at: int | None,
          progress: bool) -> Start:
    """Check the settings, find where the weights start, take the run folder (rank 0) and prepare the
    data (rank 0, before the other ranks read it). ConfigError, CheckpointError, DataError."""
    taken: list[Start] = []  # rank 0's lock, for a run another rank stops before it starts

    def start() -> Start:
        dtype = resolve_dtype(cfg.dtype, way.device)
        way.check(cfg)
        lora.check(cfg, way)
        seed_everything(cfg.seed)
        run_cfg, state, finished, path, model, tokenizer = cfg, None, None, None, None, None
        if resume is not None:
            path = run_dir.checkpoint_dir(resume)
            model, tokenizer, state = way.load_resume(path, cfg, way.device)
            out = path.parent
            run_cfg = cfg.replace(out_dir=str(out))
            note = f"resuming {path} at step {state['step']}"
            if run_dir.is_finished(path, cfg):
                finished = finished_result(path)
        else:
            model, tokenizer, note = init_model(cfg, way.device)
            out = Path(cfg.out_dir)
            if model is not None:
                # the model's own tokenizer prepares the data; the key names it where it is a name prepare
                # knows (a trained BPE's or an imported one's is not: the key stays as given)
                named = tokenizer.kind if tokenizer.kind in TOKENIZER_TYPES else cfg.tokenizer
                run_cfg = cfg.replace(model=model.config, tokenizer=named)
            if not overwrite and (done := finished_run(out, run_cfg)) is not None:
                finished = finished_result(done)
        if finished is None and stop_at is not None and stop_at <= (state["step"] if state else 0):
            raise ConfigError(f"stop_at must be after the starting step {(state or {}).get('step', 0)}")
        begun = Start(run_cfg, out, dtype, path, state, model, tokenizer, note, _NoLock(), [], None, finished)
        if finished is None and way.is_main:
            begun.created = run_dir.missing_folders(out)
            begun.lock = run_dir.check_out_dir(out, run_cfg, overwrite, resuming=state is not None)  # held to the end
            taken.append(begun)
            try:
                begun.data = None if run_cfg.sft else prepare_data(run_cfg, tokenizer, progress)
            except BaseException:
                begun.give_up()
                raise
        return begun

    begun = way.agree(start, on_peer_failure=lambda: [held.give_up() for held in taken])
    try:
        way.agree_on(begun.finished is None, f"the ranks see different run folders at {begun.out}: the run folder, "
                     "data and checkpoints must be on a file system that every node shares")
    except BaseException:
        begun.lock.release()
        raise
    return begun


@dataclass
class Data:
    """The run's dataset (data_dir, its meta.json), its samplers (val: a factory of the same
    sequence every time), the tokenizer and the model (the loaded one, or a new one sized to the data);
    new_tokens: the ids the data step added to the model's vocabulary (fine-tuning's chat markers)."""

    dir: Path
    meta: dict[str, Any]
    train: Any
    val: Callable[[], Any]
    tokenizer: Tokenizer
    model: GPT
    new_tokens: list[int] = dataclasses.field(default_factory=list)

    def bpb(self, loss: float | None) -> float | None:
        """A loss (nats per token) in bits per byte of the validation text."""
        return None if loss is None else loss / (math.log(2) * self.meta["val_bytes_per_token"])

    def info(self) -> dict[str, Any]:
        """What a checkpoint's metadata records of the dataset."""
        found = {k: self.meta[k] for k in ("source", "tokens", "vocab_size", "val_bytes_per_token")}
        return {**found, "dir": str(self.dir)}


def load_data(start: Start, way: WayOfRunning) -> Data:
    """The dataset (rank 0 prepared it), its tokenizer (a loaded model's, or the dataset's), the model
    and the samplers. ConfigError for a sample prompt the tokenizer cannot encode; TrainingError when
    the disk cannot hold the checkpoints."""
    cfg = start.cfg

    def load() -> Data:
        try:
            if cfg.sft:
                return _sft_data(start, way)
            data_dir, meta = start.data if start.data is not None else prepare_data(cfg, start.tokenizer, False)
            tokenizer = start.tokenizer or load_dataset_tokenizer(data_dir)
            check_sample_prompt(cfg, tokenizer)
            model = start.model or way.new_model(dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"]),
                                                 way.device)
            if way.is_main:
                run_dir.check_disk_space(start.out, model.num_parameters())
            train, val = make_samplers(cfg, data_dir, meta)
            return Data(data_dir, meta, train, val, tokenizer, model)
        except BaseException:
            if way.is_main:
                start.give_up()  # nothing was trained: leave no empty run folder behind
            raise

    return way.agree(load, on_peer_failure=start.give_up if way.is_main else None)


def _sft_data(start: Start, way: WayOfRunning) -> Data:
    """Supervised fine-tuning's data (training/sft.py): the conversations of cfg.sft and the starting
    model (init_from, or the run resumed) with the chat markers in its vocabulary, grown here, before
    prepare builds the optimizer. Its start line joins the run's note."""
    assert start.model is not None and start.tokenizer is not None  # sft needs init_from (the config checks)
    sft = load_sft(start.cfg, start.model, start.tokenizer)
    check_sample_prompt(start.cfg, sft.tokenizer)
    if way.is_main:
        run_dir.check_disk_space(start.out, start.model.num_parameters())
    start.note = "\n".join(filter(None, (start.note, sft.note)))
    return Data(Path(start.cfg.sft), sft.meta, sft.train, sft.val, sft.tokenizer, start.model, sft.new_tokens)


def check_sample_prompt(cfg: TrainConfig, tokenizer: Tokenizer) -> None:
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


@dataclass
class Training:
    """What the steps work on: the model (the loop saves and samples it; the way holds what the steps
    run), the optimizer, how a step computes, and where the run is (step, tokens seen, best val loss,
    seconds trained before this process: all 0 / inf for a new run)."""

    model: GPT
    optimizer: Any
    compute: Compute
    step: int = 0
    tokens_seen: int = 0
    best_val: float = math.inf
    elapsed_before: float = 0.0

    def train_state(self, sampler: Any, elapsed_s: float) -> dict[str, Any]:
        """What a last/ checkpoint holds besides the weights and the optimizer, to resume exactly."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "scaler": self.compute.scaler.state_dict(),
                "sampler": sampler.state_dict(), "rng": rng_state(), "best_val_loss": self.best_val,
                "elapsed_s": elapsed_s}


def prepare(start: Start, data: Data, way: WayOfRunning,
            make_optimizer: Callable[[GPT, TrainConfig, torch.device, Any], Any]) -> Training:
    """Wrap the model for the way of running, make the optimizer, and restore what a resumed run saved
    (optimizer, loss scaler, sampler, step and every rank's RNG). CheckpointError for a train state
    that does not fit."""
    cfg, model, device, dtype = start.cfg, data.model, way.device, start.dtype
    compute = Compute(device, dtype, torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                      else contextlib.nullcontext(), torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                      make_loss())
    # The batches hold ids of the model's own tokenizer (prepare_data checked) in windows of block_size <=
    # n_positions (the config checked): no step needs the forward's input check and its host sync.
    model.check_inputs = False
    # a --lora run: only the adapters train (and the rows of the chat markers the data step added)
    if note := lora.add_adapters(model, cfg, start.resume_path, data.new_tokens):
        start.note = f"{start.note}; {note}" if start.note else note
    way.wrap(model, cfg, compute)
    training = Training(model, make_optimizer(model, way.optimizer_config(cfg), device, compute.scaler), compute)
    state = start.state
    if state is None:
        if way.rank:
            torch.manual_seed(rank_seed(cfg.seed, way.rank, 0))  # its own dropout stream; the weights are rank 0's
        return training
    way.restore_optimizer(start.resume_path, model, training.optimizer, state)
    restore_part("scaler", compute.scaler, state, start.resume_path)
    restore_part("sampler", data.train, state, start.resume_path)  # the global sampler: the same on every rank
    training.step, training.tokens_seen = state["step"], state["tokens_seen"]
    training.best_val, training.elapsed_before = state["best_val_loss"], state["elapsed_s"]
    ranks = state.get("rng_ranks") or [state["rng"]]
    if way.rank < len(ranks):
        set_rng_state(ranks[way.rank])
    else:  # a rank the saved run did not have (resumed on more processes): a stream of its own
        set_rng_state(state["rng"])
        torch.manual_seed(rank_seed(cfg.seed, way.rank, training.step))
    return training


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of rank > 0's own random stream (dropout), from the run's seed, the rank and the
    step it starts at."""
    return (seed * 1_000_003 + rank * 7919 + step) % 2**63
