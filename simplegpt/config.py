"""Training configuration: one dataclass, TOML files, command-line overrides with type checks.

A TOML file groups the fields in tables ([data], [model], [optim], [eval], [run]) for people to
read; the dataclass is flat so any field can be overridden as `--name value`. Unknown keys and
values of the wrong type raise ConfigError naming the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

BUILTIN_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "shakespeare_char"
SECTIONS = ("data", "model", "optim", "eval", "run")


def _f(default: Any, section: str, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"section": section, "help": help, "choices": choices})


@dataclass
class TrainConfig:
    # data
    data: str = _f("shakespeare", "data", "corpus to train on: 'shakespeare' (embedded), 'tinyshakespeare', a .txt/"
                   ".jsonl file, folder, glob, URL, 'hf:NAME[:CONFIG]', or a folder made by 'simplegpt prepare'")
    data_dir: str = _f("", "data", "where the prepared dataset goes; empty = data/<corpus>_<tokenizer> under the "
                       "current directory")
    tokenizer: str = _f("char", "data", "tokenizer used to prepare the corpus", ("char", "byte", "gpt2"))
    val_fraction: float = _f(0.1, "data", "fraction of the token stream (its end) held out for validation")
    text_field: str = _f("text", "data", "field holding the text in .jsonl and Hugging Face datasets")
    batch_mode: str = _f("packed", "data", "'packed': random windows of block_size tokens; 'padded': one text per "
                         "row, padded, with an attention mask", ("packed", "padded"))
    # model
    n_layer: int = _f(4, "model", "transformer blocks")
    n_head: int = _f(4, "model", "attention heads (must divide n_embd)")
    n_embd: int = _f(128, "model", "embedding width")
    block_size: int = _f(128, "model", "context length in tokens")
    dropout: float = _f(0.0, "model", "dropout probability")
    bias: bool = _f(True, "model", "biases in linear and LayerNorm layers (GPT-2 has them)")
    init_from: str = _f("", "model", "start from weights: a simplegpt checkpoint dir or a Hugging Face GPT-2 "
                        "dir/name (its tokenizer is then used); empty = random init")
    # optim
    batch_size: int = _f(32, "optim", "sequences per micro-batch")
    grad_accum_steps: int = _f(1, "optim", "micro-batches per optimizer step")
    max_iters: int = _f(2000, "optim", "optimizer steps in the whole run")
    lr: float = _f(1e-3, "optim", "peak learning rate")
    min_lr: float = _f(1e-4, "optim", "learning rate at the end of the decay")
    schedule: str = _f("cosine", "optim", "learning-rate schedule after warmup: cosine decay to min_lr, "
                       "warmup-stable-decay (linear decay over the last decay_fraction), or constant",
                       ("cosine", "wsd", "constant"))
    warmup_iters: int = _f(100, "optim", "steps of linear warmup from 0 to lr")
    decay_fraction: float = _f(0.2, "optim", "wsd only: fraction of max_iters spent decaying to min_lr")
    weight_decay: float = _f(0.1, "optim", "AdamW weight decay on matrices")
    decay_embeddings: bool = _f(False, "optim", "also apply weight decay to the embeddings (never to biases/norms)")
    beta1: float = _f(0.9, "optim", "AdamW beta1")
    beta2: float = _f(0.99, "optim", "AdamW beta2")
    grad_clip: float = _f(1.0, "optim", "clip the global gradient norm to this (0 = off)")
    fused: bool = _f(True, "optim", "fused AdamW: PyTorch's fused kernel where it has one; for fp32 on a CPU "
                                    "simplegpt's native step (clipping and update in two multi-threaded passes)")
    # eval
    eval_interval: int = _f(250, "eval", "evaluate, sample and save a checkpoint every this many steps")
    eval_iters: int = _f(20, "eval", "validation batches per evaluation")
    log_interval: int = _f(10, "eval", "write a train record to metrics.jsonl every this many steps")
    sample_tokens: int = _f(200, "eval", "tokens to generate at each evaluation (0 = no samples)")
    sample_prompt: str = _f("", "eval", "prompt for samples; empty = start of a document")
    # run
    out_dir: str = _f("out/run", "run", "run folder: config.toml, metrics.jsonl, samples.txt, last/ and best/ "
                      "checkpoints, loss.png")
    seed: int = _f(1337, "run", "random seed for init, batches and dropout")
    device: str = _f("auto", "run", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'")
    dtype: str = _f("auto", "run", "compute dtype; 'auto' = bfloat16 on GPUs that support it, float16 on other "
                    "GPUs, float32 on CPU", ("auto", "float32", "bfloat16", "float16"))
    compile: bool = _f(False, "run", "torch.compile the model")
    num_threads: int = _f(0, "run", "CPU threads for torch; 0 = the cores other processes leave idle (set it "
                          "for bit-identical results across runs)")
    cpu_shards: int = _f(0, "run", "CPU training: split each batch over this many threads, each running its "
                         "share through the whole model on one core (faster than splitting every op for small "
                         "models); 0 = one per thread when the run is fp32 on the CPU without dropout or "
                         "compile, 1 = off")
    tensorboard: bool = _f(True, "run", "also log to TensorBoard (out_dir/tb) when tensorboard is installed")
    plot: bool = _f(True, "run", "save a loss curve loss.png at the end (needs matplotlib)")
    peak_flops: float = _f(0.0, "run", "device peak FLOP/s for MFU; 0 = known GPU table, or a measured "
                           "matmul rate on CPU")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Type and range checks; ConfigError names the field and what it accepts."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f, getattr(self, f.name)))
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum_steps", "max_iters",
                    "eval_interval", "eval_iters", "log_interval")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("warmup_iters", "sample_tokens", "num_threads", "cpu_shards"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        for name in ("weight_decay", "grad_clip", "peak_flops"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.out_dir:
            raise ConfigError("out_dir must not be empty")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "TrainConfig":
        check_keys(overrides)
        return dataclasses.replace(self, **overrides)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _type_name(f: dataclasses.Field) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[f.type]


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """value checked against the field's type; ints are accepted for floats."""
    kind = f.type
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise ConfigError(f"{f.name} must be {_type_name(f)}, got {value!r} ({type(value).__name__})")
    if kind == "float":
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{f.name} must be one of {list(choices)}, got {value!r}")
    return value


def check_keys(values: dict[str, Any], where: str = "config") -> None:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown {where} key(s) {unknown}; see 'simplegpt train --help' for the valid keys")


def parse_value(name: str, text: str) -> Any:
    """A command-line string converted to the type of field `name` (ConfigError when it cannot be)."""
    check_keys({name: None}, "option")
    f = FIELDS[name]
    try:
        if f.type == "bool":
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return _coerce(f, low in ("true", "1", "yes", "on"))
        if f.type == "int":
            return _coerce(f, int(text))
        if f.type == "float":
            return _coerce(f, float(text))
    except ValueError:
        raise ConfigError(f"{name} must be {_type_name(f)}, got {text!r}") from None
    return _coerce(f, text)


def resolve_config_path(name_or_path: str) -> Path:
    """A config file path, or a built-in config by name ('shakespeare_char', 'gpt2_124m')."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    builtin = BUILTIN_DIR / f"{name_or_path.removesuffix('.toml')}.toml"
    if builtin.is_file():
        return builtin
    names = sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))
    raise ConfigError(f"config {name_or_path!r} not found: give a .toml file or a built-in name {names}")


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """The flat {field: value} of a TOML config; tables group fields, keys are checked."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise ConfigError(f"{path}: unknown table [{key}]; tables are {list(SECTIONS)}")
            check_keys(value, f"[{key}]")
            flat.update(value)
        else:
            flat[key] = value
    check_keys(flat, f"{path.name}")
    return flat


def load_config(name_or_path: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from defaults < the config file (default: the built-in quick CPU one) < overrides."""
    values = read_toml(resolve_config_path(name_or_path or DEFAULT_CONFIG))
    values.update(overrides or {})
    check_keys(values)
    return TrainConfig(**values)


def to_toml(cfg: TrainConfig) -> str:
    """The config as TOML with its tables, loadable with --config (it is how a run records its config)."""
    lines: list[str] = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cfg):
            if f.metadata["section"] == section:
                v = getattr(cfg, f.name)
                text = "true" if v is True else "false" if v is False else json.dumps(v) if isinstance(v, str) \
                    else repr(v)
                lines.append(f"{f.name} = {text}")
        lines.append("")
    return "\n".join(lines)
