"""Training configuration: TrainConfig, its TOML files and command-line overrides with type checks.

A config has one flat vocabulary of keys: each key is a TOML key in its table ([data], [model],
[optim], [eval], [run]), a command-line option (`--n_layer 6`, `--max-iters 500`) and a keyword of
TrainConfig. The [model] keys are the model's shape, held as one GPTConfig (`cfg.model`): n_layer,
n_head, n_embd, block_size (GPTConfig's n_positions), dropout and bias; vocab_size comes from the
data when training starts. The [lora] keys (lora, lora_alpha, lora_dropout, lora_targets) make a
fine-tune train low-rank adapters only (docs/lora.md). GPTConfig checks the shape, TrainConfig the rest: unknown keys and bad
values raise ConfigError naming the key and what it accepts.

Files and checkpoints written before the shape became a GPTConfig load as they are: the keys are the
same, and a key under another table than its own (init_from under [model]) is still read.

Some keys of a config file belong to its corpus (CORPUS_KEYS): where the prepared data goes, the run
folder and the sample prompt. When the command line names other data, another tokenizer or other
starting weights, those keys follow the new data instead of the file (`default_out_dir`), so
`simplegpt train --data my.txt` neither trains into the Shakespeare run nor prompts with "HAMLET:".
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.layout import is_dataset_dir
from .errors import ConfigError
from .model import MLPS, NORMS, POSITIONS, GPTConfig

BUILTIN_DIR = Path(__file__).resolve().parent / "configs"
# A warmup not set for the run's own length takes at most this fraction of its steps (50 warmup steps of
# a 20-step run would never reach lr); one set explicitly is kept, with a warning past WARMUP_WARN_FRACTION.
WARMUP_FRACTION = 0.1
WARMUP_WARN_FRACTION = 0.25
# `simplegpt train` without --config: the speedrun recipe of the machine's device (default_config_name).
CPU_RECIPE, GPU_RECIPE = "speedrun_cpu", "speedrun_gpu"
SECTIONS = ("data", "model", "lora", "optim", "eval", "run")


@dataclass(frozen=True)
class Key:
    """A config key: its TOML table, its value type ('int', 'float', 'bool', 'str' or 'duration': seconds as
    a number or a string such as '90s', '5m', '1h'), help and choices."""

    name: str
    type: str
    section: str
    help: str
    choices: tuple[str, ...] | None = None


# The [model] table: each key and the GPTConfig field that holds it.
MODEL_KEYS: dict[str, tuple[str, Key]] = {key.name: (attr, key) for attr, key in (
    ("n_layer", Key("n_layer", "int", "model", "transformer blocks")),
    ("n_head", Key("n_head", "int", "model", "attention heads (must divide n_embd unless head_dim is set)")),
    ("n_embd", Key("n_embd", "int", "model", "embedding width")),
    ("n_positions", Key("block_size", "int", "model", "context length in tokens (the model's n_positions)")),
    ("dropout", Key("dropout", "float", "model", "dropout probability")),
    ("bias", Key("bias", "bool", "model", "biases in linear and LayerNorm layers (GPT-2 has them)")),
    ("n_kv_head", Key("n_kv_head", "int", "model", "key/value heads, grouped-query attention (Hugging Face's "
                      "num_key_value_heads; must divide n_head); 0 = n_head")),
    ("head_size", Key("head_dim", "int", "model", "width of each attention head; 0 = n_embd / n_head")),
    ("positions", Key("positions", "str", "model", "position encoding: learned (GPT-2's table) or rotary (RoPE)",
                      POSITIONS)),
    ("rope_theta", Key("rope_theta", "float", "model", "rotary positions: the base of the rotation frequencies")),
    ("norm", Key("norm", "str", "model", "normalisation layer: layernorm (GPT-2) or rmsnorm", NORMS)),
    ("norm_gain", Key("norm_gain", "bool", "model", "the norms have a learned gain (false: nanochat's plain RMSNorm)")),
    ("rms_norm_eps", Key("rms_norm_eps", "float", "model", "epsilon of RMSNorm")),
    ("mlp", Key("mlp", "str", "model", "MLP activation: gelu (GPT-2), swiglu (Llama) or relu2 (ReLU squared)", MLPS)),
    ("intermediate_size", Key("intermediate_size", "int", "model", "MLP hidden width; 0 = 4 x n_embd (swiglu: "
                              "8/3 x n_embd rounded up to a multiple of 64)")),
    ("qk_norm", Key("qk_norm", "bool", "model", "RMSNorm each head's queries and keys (Qwen3)")),
    ("tie_word_embeddings", Key("tie_word_embeddings", "bool", "model", "the output head is the token embedding "
                                "(GPT-2); false gives the head its own weights")),
)}
# The [model] keys whose 0 stands for GPTConfig's None (a default computed from the other keys).
OPTIONAL_MODEL_KEYS = ("n_kv_head", "head_dim", "intermediate_size")
# The [model] keys that fix the weights' shapes and what they compute: a resumed run keeps them.
ARCHITECTURE_KEYS = tuple(key.name for _, key in MODEL_KEYS.values() if key.name != "dropout")
# What a config saved before the Llama-style keys existed had for them: GPT-2's values.
GPT2_MODEL_VALUES = {key.name: 0 if getattr(GPTConfig(), attr) is None else getattr(GPTConfig(), attr)
                     for attr, key in MODEL_KEYS.values()
                     if key.name not in ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")}
# Fine-tuning settings: a config file written for pretraining (the built-in one included) gets these when
# the command line turns on sft, for the keys the command line leaves alone. A short run at a low learning
# rate moves the base's weights little, evaluating often on the held-out conversations; no text samples
# (`simplegpt chat` shows what the model answers).
# A pretraining file's time budget and Muon (the default recipe's) give way to a count of steps and AdamW.
SFT_DEFAULTS = {"lr": 3e-4, "min_lr": 3e-5, "max_iters": 300, "max_time": 0.0, "warmup_iters": 20,
                "batch_size": 16, "grad_accum_steps": 1, "eval_interval": 50, "eval_iters": 10, "sample_tokens": 0,
                "dropout": 0.0, "optimizer": "adamw", "schedule": "cosine"}
# What a run on the default recipe trains with instead of its Muon where Muon cannot run (FSDP2, LoRA) or
# was not what the recipe was measured for (fine-tuning weights): AdamW at the learning rate it had in the
# speedrun's ablation (docs/speedrun.md), decaying to a tenth of it as the AdamW configs do, unless the
# command line names an optimizer (or an lr: then min_lr keeps the ratio).
ADAMW_FALLBACK = {"optimizer": "adamw", "lr": 2e-3, "min_lr": 2e-4}
DEFAULT_MODEL = GPTConfig(n_layer=4, n_head=4, n_embd=128, n_positions=128, dropout=0.0, bias=True)


def _f(default: Any, section: str, help: str, choices: tuple[str, ...] | None = None, kind: str = "") -> Any:
    return field(default=default, metadata={"section": section, "help": help, "choices": choices, "kind": kind})


@dataclass(init=False)
class TrainConfig:
    """Everything a training run needs. Keys go in by their flat names, `TrainConfig(n_layer=6, lr=3e-4)`,
    or the shape as a GPTConfig, `TrainConfig(model=GPTConfig(...), lr=3e-4)` (flat shape keys given
    too override its fields). `cfg.model` is the shape; its vocab_size is a placeholder until the
    trainer takes the data's. cfg.n_layer, cfg.block_size, ... read cfg.model.
    ConfigError for an unknown key or a bad value."""

    # data
    data: str = _f("shakespeare", "data", "corpus to train on: 'shakespeare' (embedded), 'tinyshakespeare', a .txt/"
                   ".jsonl file, folder, glob, URL, 'hf:NAME[:CONFIG]', or a folder made by 'simplegpt prepare'")
    data_dir: str = _f("", "data", "where the prepared dataset goes; empty = data/<corpus>_<tokenizer> under the "
                       "current directory (a config file's data_dir applies to its own data only)")
    tokenizer: str = _f("char", "data", "tokenizer used to prepare the corpus: char, byte, gpt2 or bpe:N (a "
                        "byte-level BPE of N >= 256 tokens trained on the corpus)")
    val_fraction: float = _f(0.1, "data", "fraction of the token stream (its end) held out for validation")
    text_field: str = _f("text", "data", "field holding the text in .jsonl and Hugging Face datasets")
    unknown_chars: str = _f("error", "data", "characters of the text that a fixed character vocabulary (of the "
                            "--init-from model, or of a resumed run) has no token for: 'error' names them and stops, "
                            "'drop' leaves them out, and a character of the vocabulary (such as ' ') takes their place")
    batch_mode: str = _f("packed", "data", "'packed': random windows of block_size tokens; 'padded': one text per "
                         "row, padded, with an attention mask", ("packed", "padded"))
    sft: str = _f("", "data", "supervised fine-tuning for chat (needs init_from) on conversations: a JSONL file of "
                  "{\"messages\": [{\"role\", \"content\"}, ...]} lines, a folder written by datasets' save_to_disk, "
                  "a .parquet file or 'hf:NAME[:CONFIG]'; the loss counts the assistant's tokens only, val_fraction "
                  "of the conversations is held out for evaluation, and data/tokenizer are not used (docs/chat.md). "
                  "Given on the command line with a config file that has no sft, the keys not given there are "
                  "fine-tuning's: " + ", ".join(f"{k} {v:g}" if isinstance(v, float | int) else f"{k} {v}"
                                                 for k, v in SFT_DEFAULTS.items())
                  + ", block_size the base's")
    sft_pack: bool = _f(False, "data", "sft only: fill each row with as many whole conversations as fit, instead of "
                        "one conversation per row (fewer rows; later conversations then see the earlier ones)")
    # model: the shape ([model] table), see MODEL_KEYS
    model: GPTConfig = field(default_factory=lambda: DEFAULT_MODEL)
    # lora: low-rank adapters on an --init-from model (simplegpt.training.lora, docs/lora.md)
    lora: int = _f(0, "lora", "LoRA rank: train low-rank adapters on the --init-from model's linear layers, its "
                   "weights frozen (16 is common); 0 = off, every weight trains")
    lora_alpha: float = _f(0.0, "lora", "LoRA scale numerator: the adapters' output is scaled by lora_alpha / lora; "
                           "0 = twice the rank")
    lora_dropout: float = _f(0.0, "lora", "dropout on the adapters' input")
    lora_targets: str = _f("attn,mlp", "lora", "layers that get adapters, comma-separated: attn (c_attn, attn.c_proj), "
                           "mlp (c_fc, mlp.c_proj), or module names c_attn, c_proj, c_fc, attn.c_proj, mlp.c_proj")
    # optim
    batch_size: int = _f(32, "optim", "sequences per micro-batch")
    grad_accum_steps: int = _f(1, "optim", "micro-batches per optimizer step, over all processes: "
                               "batch_size x grad_accum_steps sequences make one step whatever the number of "
                               "processes; under torchrun each of N ranks computes grad_accum_steps / N of them "
                               "(N must divide it)")
    max_iters: int = _f(2000, "optim", "optimizer steps in the whole run, for a run without a time budget: "
                        "given without max_time (--time) it replaces the config file's budget (the default "
                        "recipe's 5 minutes) and the schedule follows the steps; with a budget it is not used")
    lr: float = _f(1e-3, "optim", "peak learning rate")
    min_lr: float = _f(1e-4, "optim", "learning rate at the end of the decay (on the command line, --lr alone "
                       "scales the config file's min_lr with it)")
    schedule: str = _f("cosine", "optim", "learning-rate schedule after warmup: cosine decay to min_lr, "
                       "warmup-stable-decay (linear decay over the last decay_fraction), or constant",
                       ("cosine", "wsd", "constant"))
    warmup_iters: int = _f(100, "optim", "steps of linear warmup from 0 to lr; unless set with max_iters (on the "
                           "command line, or both in the config file) at most a tenth of max_iters, so a short "
                           "run reaches lr and decays")
    decay_fraction: float = _f(0.2, "optim", "wsd only: fraction of max_iters (of max_time, under a time budget) "
                               "spent decaying to min_lr")
    warmup_fraction: float = _f(0.02, "optim", "under a time budget (max_time): fraction of the budget spent "
                                "warming up from 0 to lr (warmup_iters is for runs of max_iters steps)")
    optimizer: str = _f("adamw", "optim", "'adamw', or 'muon': Muon for the blocks' weight matrices and AdamW for "
                        "embeddings, LayerNorm gains and biases (Keller Jordan's recipe; one process or DDP)",
                        ("adamw", "muon"))
    muon_momentum: float = _f(0.95, "optim", "optimizer = 'muon' only: Muon's Nesterov momentum (Keller Jordan's "
                              "recipe: 0.95)")
    adamw_lr_ratio: float = _f(1.0, "optim", "optimizer = 'muon' only: the learning rate of its AdamW half (embeddings, "
                               "head, norms, biases) as a multiple of lr, following the same schedule")
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
    sample_prompt: str = _f("", "eval", "prompt for samples, checked against the tokenizer before training; "
                            "empty = start of a document (a config file's prompt applies to its own data only)")
    # run
    out_dir: str = _f("out/run", "run", "run folder: config.toml, metrics.jsonl, samples.txt, last/ and best/ "
                      "checkpoints, loss.png; on the command line it follows --data, --tokenizer and --init-from "
                      "unless given: out/<corpus>_<tokenizer>, out/<dataset folder>, out/<corpus>_from_<weights>")
    init_from: str = _f("", "run", "start from weights: a simplegpt checkpoint dir or a Hugging Face GPT-2, Llama or "
                        "Qwen3 dir/name (its tokenizer is then used); empty = random init")
    max_time: float = _f(0.0, "run", "time budget: train for this long (seconds, or a duration such as '90s', "
                         "'5m', '1h'; also --time) instead of max_iters steps, with the learning-rate schedule "
                         "set by the fraction of the budget used; evaluations and the setup before the first "
                         "step are not counted; 0 = off (the default recipe has 5m; --max_iters N without --time "
                         "trains N steps instead)", kind="duration")
    seed: int = _f(1337, "run", "random seed for init, batches and dropout")
    device: str = _f("auto", "run", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'")
    dtype: str = _f("auto", "run", "compute dtype; 'auto' = bfloat16 on GPUs that support it, float16 on other "
                    "GPUs, float32 on CPU", ("auto", "float32", "bfloat16", "float16"))
    compile: bool = _f(False, "run", "torch.compile the model")
    num_threads: int = _f(0, "run", "CPU threads for torch; 0 = the cores other processes leave idle, or under "
                          "torchrun the cores shared out over the node's processes (set it for bit-identical "
                          "results across runs)")
    cpu_shards: int = _f(0, "run", "CPU training: split each batch over this many threads, each running its "
                         "share through the whole model on one core (faster than splitting every op for small "
                         "models); 0 = one per thread when the run is fp32 on the CPU without dropout or "
                         "compile, 1 = off")
    parallel: str = _f("ddp", "run", "under torchrun: 'ddp' (DistributedDataParallel, every rank holds the whole "
                       "model) or 'fsdp' (FSDP2, parameters and optimizer state sharded over the ranks); "
                       "a plain 'simplegpt train' is one process either way (fsdp then says so and "
                       "saves a plain checkpoint)", ("ddp", "fsdp"))
    dist_timeout: int = _f(120, "run", "under torchrun: seconds a rank waits for the others (a collective, rank 0 "
                           "saving a checkpoint) before it stops with an error; a dead rank ends the run within it")
    tensorboard: bool = _f(True, "run", "also log to TensorBoard (out_dir/tb) when tensorboard is installed")
    plot: bool = _f(True, "run", "save a loss curve loss.png and the run report report.html at the end")
    peak_flops: float = _f(0.0, "run", "device peak FLOP/s for MFU; 0 = a known GPU's bf16 peak, or on a CPU "
                           "the float32 peak of the cores used (the higher of its FMA width x clock and a "
                           "timed matmul); a GPU not in the table reads MFU unknown until this is set")

    def __init__(self, *, model: GPTConfig | None = None, **values: Any) -> None:
        check_keys(values)
        for f in dataclasses.fields(self):
            if f.name != "model":
                setattr(self, f.name, values.get(f.name, f.default))
        shape = {}
        for name, (attr, key) in MODEL_KEYS.items():
            if name in values:
                value = _coerce(key, values[name])
                shape[attr] = None if name in OPTIONAL_MODEL_KEYS and value == 0 else value
        try:
            self.model = dataclasses.replace(model or DEFAULT_MODEL, **shape)
        except ValueError as e:  # GPTConfig's own checks of the shape, said in the config's key names
            said = re.sub(r"\bn_positions\b", "block_size", str(e).replace("GPTConfig.", ""))
            raise ConfigError(re.sub(r"\bhead_size\b", "head_dim", said)) from None
        self.validate()
        if "warmup_iters" not in values:  # the default warmup, fitted to the run
            self.warmup_iters = fitted_warmup(self.warmup_iters, self.max_iters)

    @property
    def n_layer(self) -> int:
        return self.model.n_layer

    @property
    def n_head(self) -> int:
        return self.model.n_head

    @property
    def n_embd(self) -> int:
        return self.model.n_embd

    @property
    def block_size(self) -> int:
        """Context length in tokens: the model's n_positions."""
        return self.model.n_positions

    @property
    def dropout(self) -> float:
        return self.model.dropout

    @property
    def bias(self) -> bool:
        return self.model.bias

    def __getattr__(self, name: str) -> Any:
        """The other [model] keys (cfg.mlp, cfg.n_kv_head, ...) read cfg.model; 0 for a computed default."""
        if name in MODEL_KEYS and "model" in self.__dict__:
            value = getattr(self.__dict__["model"], MODEL_KEYS[name][0])
            return 0 if value is None else value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def validate(self) -> None:
        """Type and range checks of the keys outside [model] (GPTConfig checks the shape); ConfigError
        names the key and what it accepts."""
        for f in dataclasses.fields(self):
            if f.name != "model":
                setattr(self, f.name, _coerce(KEYS[f.name], getattr(self, f.name)))
        positive = ("batch_size", "grad_accum_steps", "max_iters", "eval_interval", "eval_iters", "log_interval",
                    "dist_timeout")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("warmup_iters", "sample_tokens", "num_threads", "cpu_shards", "lora", "lora_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.unknown_chars not in ("error", "drop") and len(self.unknown_chars) != 1:
            raise ConfigError(f"unknown_chars must be 'error', 'drop' or one character, got {self.unknown_chars!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.max_time < 0:
            raise ConfigError(f"max_time must be >= 0 seconds (0 = no time budget), got {self.max_time:g}")
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not self.adamw_lr_ratio > 0:
            raise ConfigError(f"adamw_lr_ratio must be > 0, got {self.adamw_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        for name in ("weight_decay", "grad_clip", "peak_flops"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.out_dir:
            raise ConfigError("out_dir must not be empty")
        if self.sft and not self.init_from:
            raise ConfigError("sft fine-tunes a trained model: give the base with --init-from (a simplegpt "
                              "checkpoint or a Hugging Face model)")

    def to_dict(self) -> dict[str, Any]:
        """{key: value} for every key (flat, as in a checkpoint's train_config and on the command line)."""
        return {name: getattr(self, name) for name in KEYS}

    def replace(self, **overrides: Any) -> "TrainConfig":
        """A copy with some keys changed (flat names; model=GPTConfig(...) replaces the whole shape)."""
        model = overrides.pop("model", self.model)
        kept = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        return TrainConfig(model=model, **{**kept, **overrides})


def _keys() -> dict[str, Key]:
    """Every key, table by table (the order of --help and of a saved config.toml)."""
    keys = [Key(f.name, f.metadata["kind"] or f.type, f.metadata["section"], f.metadata["help"],
                f.metadata["choices"]) for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    keys += [key for _, key in MODEL_KEYS.values()]
    return {key.name: key for section in SECTIONS for key in keys if key.section == section}


KEYS = _keys()


def _type_name(key: Key) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
            "duration": "seconds or a duration such as '90s', '5m', '1h'"}[key.type]


_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|m|min|h)?\s*", re.IGNORECASE)
_UNIT_S = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds of a duration: '300' or '300s', '5m' / '5min', '1.5h'. ValueError for anything else."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    return float(match.group(1)) * _UNIT_S[(match.group(2) or "").lower()]


def _coerce(key: Key, value: Any) -> Any:
    """value checked against the key's type; ints are accepted for floats."""
    kind = key.type
    if kind == "duration":  # seconds: a number, or a string with its unit
        if isinstance(value, str):
            try:
                value = parse_duration(value)
            except ValueError:
                raise ConfigError(f"{key.name} must be {_type_name(key)}, got {value!r}") from None
        kind = "float"
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise ConfigError(f"{key.name} must be {_type_name(key)}, got {value!r} ({type(value).__name__})")
    if kind == "float":
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key.name} must be a finite number, got {value!r}")
    if key.choices and value not in key.choices:
        raise ConfigError(f"{key.name} must be one of {list(key.choices)}, got {value!r}")
    if key.name == "tokenizer":
        from .tokenizer import check_tokenizer_name
        try:
            check_tokenizer_name(value)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return value


def check_keys(values: dict[str, Any], where: str = "config") -> None:
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ConfigError(f"unknown {where} key(s) {unknown}; see 'simplegpt train --help' for the valid keys")


def parse_value(name: str, text: str) -> Any:
    """A command-line string converted to the type of key `name` (ConfigError when it cannot be)."""
    check_keys({name: None}, "option")
    key = KEYS[name]
    try:
        if key.type == "bool":
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return _coerce(key, low in ("true", "1", "yes", "on"))
        if key.type == "int":
            return _coerce(key, int(text))
        if key.type == "float":
            return _coerce(key, float(text))
        if key.type == "duration":
            return _coerce(key, text)
    except ValueError:
        raise ConfigError(f"{name} must be {_type_name(key)}, got {text!r}") from None
    return _coerce(key, text)


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
    """The flat {key: value} of a TOML config; tables group the keys, which are checked (a key under
    another known table than its own is read too, as files written before [model] was the shape have it)."""
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


# The keys that say which data a run is about (and the run that is made from it), and the keys of a
# config file that belong to its data: the file's data_dir, out_dir and sample_prompt are the
# file's corpus's, so they give way to defaults that follow the data named on the command line.
DATA_IDENTITY = ("data", "tokenizer", "init_from", "sft")
CORPUS_KEYS = {"data_dir": DATA_IDENTITY, "out_dir": DATA_IDENTITY, "sample_prompt": ("data", "sft")}


def default_config_name(overrides: dict[str, Any] | None = None) -> str:
    """The built-in config a run without --config gets: the speedrun recipe of the device it trains on,
    GPU_RECIPE where that is a CUDA GPU (device 'cuda...', or 'auto' with one present), else CPU_RECIPE."""
    import torch

    device = (overrides or {}).get("device", "auto")
    gpu = device.startswith("cuda") if isinstance(device, str) and device != "auto" else torch.cuda.is_available()
    return GPU_RECIPE if gpu else CPU_RECIPE


def adamw_fallback(overrides: dict[str, Any]) -> str | None:
    """Why a run on the default recipe trains with ADAMW_FALLBACK instead of its Muon, or None: the
    command line names no optimizer and asks for FSDP2 or LoRA (which refuse Muon) or a fine-tune."""
    if "optimizer" in overrides:
        return None
    if overrides.get("parallel") == "fsdp":
        return "parallel = 'fsdp' (FSDP2 cannot run Muon)"
    if overrides.get("lora"):
        return "--lora (LoRA cannot run Muon)"
    if overrides.get("sft") or overrides.get("init_from"):
        return "a fine-tune of --init-from's weights"
    return None


def load_config(name_or_path: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from defaults < the config file < overrides.

    Without a file, the machine's speedrun recipe (default_config_name: configs/speedrun_cpu.toml or
    speedrun_gpu.toml), with the run folder following the data (out/shakespeare_char for the embedded
    plays) and, where adamw_fallback says so, AdamW instead of Muon.

    A corpus key of the file (CORPUS_KEYS) is dropped when the overrides change what it belongs to
    (e.g. --data): data_dir then defaults to data/<corpus>_<tokenizer>, out_dir to default_out_dir's
    folder and sample_prompt to empty (the start of a document). An lr given without a min_lr
    scales the file's min_lr with it (2e-3 -> 2e-4 in the file, --lr 1e-4 -> 1e-5). A max_iters given
    without a max_time trains that many steps: the file's time budget, if it has one, is dropped."""
    overrides = overrides or {}
    check_keys(overrides, "option")
    values = read_toml(resolve_config_path(name_or_path or default_config_name(overrides)))
    if name_or_path is None:
        values.pop("out_dir", None)  # the recipe's run folder is the bench's; the default run's follows its data
        if adamw_fallback(overrides):
            values.update(ADAMW_FALLBACK)
    values = _with_sft_defaults(values, overrides)
    defaults = {name: f.default for name, f in TrainConfig.__dataclass_fields__.items() if name in KEYS}
    changed = {k for k in DATA_IDENTITY if k in overrides and overrides[k] != values.get(k, defaults[k])}
    for key, follows in CORPUS_KEYS.items():
        if key not in overrides and changed & set(follows):
            values.pop(key, None)
    if "lr" in overrides and "min_lr" not in overrides:  # --lr alone: the schedule keeps the file's lr/min_lr
        lr, min_lr = values.get("lr", defaults["lr"]), values.get("min_lr", defaults["min_lr"])
        values["min_lr"] = min_lr * overrides["lr"] / lr if isinstance(overrides["lr"], (int, float)) and lr else min_lr
    if "max_iters" in overrides and "max_time" not in overrides:  # a count of steps asked for replaces the
        values.pop("max_time", None)                                 # file's time budget
    # A warmup chosen for another length of run (the file's, for its max_iters; the default) fits this one.
    fit = "warmup_iters" not in overrides and ("warmup_iters" not in values or "max_iters" in overrides)
    values.update(overrides)
    max_iters = values.get("max_iters", defaults["max_iters"])
    warmup = values.get("warmup_iters", defaults["warmup_iters"])
    if fit and isinstance(max_iters, int) and isinstance(warmup, int):  # other types: TrainConfig says what is wrong
        values["warmup_iters"] = fitted_warmup(warmup, max_iters)
    if "out_dir" not in values:
        merged = {**defaults, **values}
        values["out_dir"] = default_out_dir(merged["data"], merged["tokenizer"], merged["init_from"], merged["sft"])
    check_keys(values)
    return TrainConfig(**values)


def _with_sft_defaults(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The config file's values, with SFT_DEFAULTS in place of the ones the command line leaves alone
    when the command line turns on sft and the file (written for pretraining) does not; block_size
    then becomes the context of an init_from that is a simplegpt checkpoint."""
    if not overrides.get("sft") or values.get("sft"):
        return values
    # an lr given alone keeps the file's min_lr for load_config to scale with it
    given = set(overrides) | ({"min_lr"} if "lr" in overrides else set())
    values = {**values, **{k: v for k, v in SFT_DEFAULTS.items() if k not in given}}
    if "block_size" not in overrides and isinstance(base := overrides.get("init_from"), str) and base:
        from .checkpoint import read_checkpoint_config
        from .errors import CheckpointError

        try:  # the base's whole context (the file's block_size would crop it); other bases keep the file's
            values["block_size"] = int(read_checkpoint_config(base)["model"]["n_positions"])
        except (CheckpointError, KeyError, TypeError, ValueError):
            pass
    return values


def fitted_warmup(warmup_iters: int, max_iters: int) -> int:
    """A warmup of warmup_iters steps, shortened to WARMUP_FRACTION of a run of max_iters steps."""
    return min(warmup_iters, int(max_iters * WARMUP_FRACTION))


def long_warmup_warning(cfg: TrainConfig) -> str | None:
    """A warning when the warmup takes more than WARMUP_WARN_FRACTION of the run (set so explicitly)."""
    if cfg.warmup_iters <= WARMUP_WARN_FRACTION * cfg.max_iters:
        return None
    if cfg.warmup_iters >= cfg.max_iters:
        what = f"longer than the run's {cfg.max_iters} steps: the learning rate never reaches lr = {cfg.lr:g}"
    else:
        what = (f"{cfg.warmup_iters / cfg.max_iters:.0%} of the run's {cfg.max_iters} steps: the learning rate "
                f"reaches lr = {cfg.lr:g} late and has little of the run left to decay")
    return (f"warning: the warmup (warmup_iters = {cfg.warmup_iters}) is {what}; leave warmup_iters unset (it is "
            f"then at most {WARMUP_FRACTION:.0%} of max_iters) or set a smaller one")


def corpus_slug(source: str) -> str:
    """A short folder-name form of a corpus or checkpoint name: 'my_texts/' -> 'my_texts',
    'hf:HuggingFaceFW/fineweb-edu' -> 'fineweb_edu', 'https://x.org/book.txt' -> 'book'."""
    name = Path(source.removeprefix("hf:").rstrip("/")).stem
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "corpus"


def tokenizer_slug(name: str) -> str:
    """A tokenizer name as a folder name's part: 'bpe:8192' -> 'bpe8192' (no colon in a path)."""
    return name.replace(":", "")


def default_out_dir(data: str, tokenizer: str, init_from: str = "", sft: str = "") -> str:
    """The run folder a run gets when none is given: out/<corpus>_<tokenizer> (out/<folder> for a
    dataset prepared by 'simplegpt prepare', whose folder already names it), and for a fine-tune
    out/<corpus>_from_<weights> (a checkpoint's run folder for RUN/best or RUN/last), the corpus
    being the conversations of sft when it is set. Two runs on other data or from other weights
    never share a folder."""
    prepared = is_dataset_dir(data)
    corpus = corpus_slug(data) if prepared else f"{corpus_slug(data)}_{tokenizer_slug(tokenizer)}"
    if init_from:
        src = Path(init_from.rstrip("/"))
        weights = src.parent.name if src.name in ("best", "last") and src.parent.name else src.name
        corpus = f"{corpus_slug(sft or data)}_from_{corpus_slug(weights)}"
    return str(Path("out") / corpus)


def to_toml(cfg: TrainConfig) -> str:
    """The config as TOML with its tables, loadable with --config (it is how a run records its config)."""
    lines: list[str] = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for name, key in KEYS.items():
            if key.section == section:
                v = getattr(cfg, name)
                text = "true" if v is True else "false" if v is False else json.dumps(v) if isinstance(v, str) \
                    else repr(v)
                lines.append(f"{name} = {text}")
        lines.append("")
    return "\n".join(lines)
