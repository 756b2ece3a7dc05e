"""LoRA fine-tuning (`simplegpt train --lora RANK --init-from CHECKPOINT`) through Hugging Face `peft`.

peft's LoraConfig and inject_adapter_in_model wrap the named nn.Linear layers of a plain model.GPT in
place (each becomes a peft LoRA layer whose base_layer is the original Linear, frozen) and leave
only the adapters' low-rank factors trainable: the optimizer, which takes the parameters that
require gradients, gets those alone. Each wrapped layer computes

    y = base_layer(x) + lora_B(lora_A(dropout(x))) * alpha / rank      # x (..., in) -> y (..., out)

lora_A (rank, in) starts random and lora_B (out, rank) at zero, so step 0 is the base model.

Targets are named by group or by module, comma-separated: `attn` (attn.c_attn and attn.c_proj),
`mlp` (mlp.c_fc and mlp.c_proj), or a module name (c_attn, c_proj, c_fc, attn.c_proj, mlp.c_proj).
The embeddings and the output head never get adapters. When supervised fine-tuning added the chat
markers to the base's vocabulary (their rows start at the mean of the others), those rows train too,
through peft's trainable tokens (LoraConfig.trainable_token_indices): peft wraps the token embedding
(and an untied head) so that the listed rows come from a small trainable (rows, C) tensor, and a tied
head follows the embedding.

A LoRA checkpoint is a plain simplegpt checkpoint whose model.safetensors holds the merged weights
(W + B A alpha / rank), so every reader (generate, serve, chat, eval, export-hf, export-gguf,
--init-from) sees the fine-tuned model without knowing of LoRA, plus a folder beside it:

    lora/adapter_config.json        peft's LoraConfig (peft loads it onto simplegpt's GPT)
    lora/adapter_model.safetensors  the adapters, with peft's key names
    lora/base.safetensors           the base weights of the wrapped layers, exactly (of a trainable
                                    token layer, its listed rows: NAME.token_rows)

A resume rebuilds the base from model.safetensors and lora/base.safetensors and takes the adapters
from lora/, so the base is bit-identical and the losses those of an uninterrupted run.
`export-hf --adapters-only` writes lora/ as a folder that peft.PeftModel.from_pretrained loads onto
the base exported by export-hf (export_adapters): Hugging Face's GPT-2 as it is, and a Llama-style
model's fused layers split into Hugging Face's (hf_adapters).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..config import TrainConfig
from ..errors import CheckpointError, ConfigError, MissingDependencyError

LORA_DIR = "lora"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_WEIGHTS = "base.safetensors"
ADAPTER = "default"  # peft's name of the one adapter
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before each module name
TOKEN_ROWS = ".token_rows"  # base.safetensors' key suffix of a trainable token layer's base rows
WTE, HEAD = "transformer.wte", "lm_head"
INSTALL_HINT = 'install the LoRA extra: pip install "simplegpt-toolkit[lora]"'

# The blocks' linear layers a target name stands for (suffixes of the module names).
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("attn.c_attn", "attn.c_proj"),
    "mlp": ("mlp.c_fc", "mlp.c_proj"),
    "c_attn": ("attn.c_attn",),
    "c_fc": ("mlp.c_fc",),
    "c_proj": ("attn.c_proj", "mlp.c_proj"),
    "attn.c_attn": ("attn.c_attn",),
    "attn.c_proj": ("attn.c_proj",),
    "mlp.c_fc": ("mlp.c_fc",),
    "mlp.c_proj": ("mlp.c_proj",),
}
LORA_OPTIONS = ("lora_alpha", "lora_dropout", "lora_targets")


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise MissingDependencyError(f"--lora needs Hugging Face peft; {INSTALL_HINT}") from None
    return peft


def target_modules(spec: str) -> list[str]:
    """The module-name suffixes of spec ('attn,mlp' -> attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj),
    in the blocks' order; ConfigError for an empty spec or an unknown name."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise ConfigError("lora_targets is empty; name the layers to adapt, e.g. --lora_targets attn,mlp")
    for name in names:
        if name not in TARGET_GROUPS:
            raise ConfigError(f"unknown LoRA target {name!r} in lora_targets; choose from "
                              f"{', '.join(TARGET_GROUPS)} (comma-separated)")
    chosen = {suffix for name in names for suffix in TARGET_GROUPS[name]}
    return [suffix for suffix in TARGET_GROUPS["attn"] + TARGET_GROUPS["mlp"] if suffix in chosen]


def alpha(cfg: TrainConfig) -> float:
    """The run's lora_alpha: as set, or twice the rank when 0 (a scale alpha / rank of 2)."""
    return cfg.lora_alpha or 2.0 * cfg.lora


def check_overrides(overrides: dict[str, Any]) -> None:
    """ConfigError for LoRA options on the command line that cannot mean anything: --lora 0 (a rank is
    1 or more), or lora_alpha / lora_dropout / lora_targets without --lora."""
    if overrides.get("lora") == 0:
        raise ConfigError("--lora 0: a LoRA rank is 1 or more (16 is common); leave --lora out to fine-tune "
                          "every weight")
    if "lora" not in overrides and (given := [k for k in LORA_OPTIONS if k in overrides]):
        raise ConfigError(f"--{given[0]} applies to LoRA runs only; add --lora RANK")


def check(cfg: TrainConfig, way: Any) -> None:
    """ConfigError, before anything is made, for LoRA settings this run cannot take: no starting
    weights, unknown targets, FSDP2 or Muon. Nothing for a run without LoRA."""
    if not cfg.lora:
        return
    if not cfg.init_from:
        raise ConfigError("--lora trains adapters on top of existing weights: give --init-from CHECKPOINT "
                          "(a simplegpt checkpoint or a Hugging Face GPT-2)")
    target_modules(cfg.lora_targets)
    if way.name == "fsdp":
        raise ConfigError("--lora cannot run with parallel = 'fsdp': the adapters are a small fraction of the "
                          "weights, and FSDP2 shards the frozen base too; use parallel = 'ddp'")
    if cfg.optimizer == "muon":
        raise ConfigError("--lora cannot run with optimizer = 'muon': Muon orthogonalizes whole weight matrices, "
                          "and LoRA trains only their low-rank factors; use optimizer = 'adamw'")
    _peft()


def lora_config(cfg: TrainConfig, base: str = "", tokens: dict[str, list[int]] | None = None) -> Any:
    """peft's LoraConfig of the run (simplegpt's nn.Linear layers: fan_in_fan_out False); tokens: the
    rows each token layer trains (token_layers), or None."""
    peft = _peft()
    return peft.LoraConfig(r=cfg.lora, lora_alpha=alpha(cfg), lora_dropout=cfg.lora_dropout,
                           target_modules=target_modules(cfg.lora_targets), bias="none",
                           base_model_name_or_path=base or None, trainable_token_indices=tokens or None)


def token_layers(model: nn.Module, ids: list[int]) -> dict[str, list[int]]:
    """The layers whose rows `ids` train, as peft's trainable_token_indices: the token embedding, and the
    head when it is not tied to it (a tied head follows the embedding). Empty for no ids."""
    if not ids:
        return {}
    return {WTE: sorted(ids)} if model.config.tie_word_embeddings else {WTE: sorted(ids), HEAD: sorted(ids)}


def _inject(peft: Any, config: Any, model: nn.Module) -> None:
    """peft.inject_adapter_in_model(config, model). Trainable tokens on a tied head make peft ask the model
    for transformers' get_input_embeddings and _tied_weights_keys, which a plain GPT has not: they are
    given for the call only."""
    if config.trainable_token_indices and model.config.tie_word_embeddings:
        model.get_input_embeddings = lambda: model.transformer.wte  # the wrapper, once peft has put it there
        model._tied_weights_keys = [f"{HEAD}.weight"]
        try:
            peft.inject_adapter_in_model(config, model)
        finally:
            del model.get_input_embeddings, model._tied_weights_keys
    else:
        peft.inject_adapter_in_model(config, model)


def has_adapters(model: nn.Module) -> bool:
    """Whether model holds peft LoRA layers."""
    return any(_is_lora_layer(m) for m in model.modules())


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def _token_layers_of(model: nn.Module) -> dict[str, nn.Module]:
    """peft's trainable-token layers of model by the name of the layer they wrap (transformer.wte,
    lm_head), the tied head's left out (it shares the embedding's rows)."""
    return {name.removesuffix(".token_adapter"): m for name, m in model.named_modules()
            if hasattr(m, "trainable_tokens_delta") and hasattr(m, "base_layer") and not m.tied_adapter}


def saved_token_indices(folder: Path) -> dict[str, list[int]]:
    """The trainable_token_indices of an adapter folder's adapter_config.json ({} when none)."""
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return config.get("trainable_token_indices") or {}


def add_adapters(model: nn.Module, cfg: TrainConfig, resume_path: Path | None = None,
                 new_tokens: list[int] | None = None) -> str:
    """Wrap cfg's target layers of model in LoRA adapters, in place, and freeze everything else but the
    rows of new_tokens (ids added to the vocabulary, whose rows start at the mean: token_layers); the
    adapters and rows of the checkpoint at resume_path when resuming (random A, zero B and the rows as
    they are otherwise). Returns the line the run logs. Nothing (and '') without cfg.lora.
    CheckpointError for adapters that do not fit."""
    if not cfg.lora:
        return ""
    peft = _peft()
    folder = Path(resume_path) / LORA_DIR if resume_path is not None else None
    tokens = saved_token_indices(folder) if folder is not None else token_layers(model, new_tokens or [])
    _inject(peft, lora_config(cfg, cfg.init_from, tokens), model)
    if folder is not None:
        from safetensors.torch import load_file

        saved = load_file(str(folder / ADAPTER_WEIGHTS))
        state = {k.removeprefix(PEFT_PREFIX): v for k, v in saved.items()}
        result = peft.set_peft_model_state_dict(model, state)
        if result.unexpected_keys or len(state) != len(adapter_parameters(model)):
            raise CheckpointError(f"{resume_path / LORA_DIR / ADAPTER_WEIGHTS} does not hold this run's adapters; "
                                  "use another checkpoint")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    layers = sum(1 for m in model.modules() if _is_lora_layer(m))
    rows = f" and the rows of the {len(tokens[WTE])} tokens added to the vocabulary" if tokens else ""
    targets = ", ".join(target_modules(cfg.lora_targets))
    return (f"LoRA: rank {cfg.lora}, alpha {alpha(cfg):g}, on {layers} layers ({targets}){rows}: "
            f"{trainable:,} trainable parameters of {total:,} ({trainable / total:.2%}); the base stays frozen")


def adapter_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under peft's saved names (module.lora_A.weight), without the prefix."""
    peft = _peft()
    # the embeddings are never targets; "auto" would look for the base's config (on the hub, for a name)
    return peft.get_peft_model_state_dict(model, save_embedding_layers=False)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model's weights under model.GPT's names (a tied head left out), each wrapped layer's weight
    merged with its adapter: W + delta (peft's get_delta_weight, B A alpha / rank), and a trainable
    token layer's weight with its trained rows. The model is not changed. Contiguous CPU tensors, as
    checkpoint.model_state_dict gives."""
    from ..checkpoint import TIED_KEY

    deltas = {f"{name}.weight": m.get_delta_weight(ADAPTER) for name, m in model.named_modules() if _is_lora_layer(m)}
    rows = {f"{name}.weight": m.get_merged_weights([ADAPTER]) for name, m in _token_layers_of(model).items()}
    out = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key or ".trainable_tokens_" in key:
            continue
        key = key.replace(".token_adapter.", ".").replace(".base_layer.", ".")
        if key == TIED_KEY and model.config.tie_word_embeddings:
            continue  # it is wte, as checkpoint.model_state_dict leaves it out
        value = rows.get(key, value).detach()
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        out[key] = value.to("cpu").contiguous()
    return out


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The wrapped layers' base weights under model.GPT's names, and each trainable token layer's base
    rows (NAME.token_rows, (rows, C), in its sorted token order): what lora/base.safetensors holds."""
    out = {f"{name}.weight": m.base_layer.weight.detach().to("cpu").contiguous()
           for name, m in model.named_modules() if _is_lora_layer(m)}
    for name, m in _token_layers_of(model).items():
        out[name + TOKEN_ROWS] = m.base_layer.weight.detach()[m.token_indices[ADAPTER]].to("cpu").contiguous()
    return out


def checkpoint_writer(model: nn.Module) -> Callable[[Path], None] | None:
    """For checkpoint.save_checkpoint's write_weights: a function that writes a LoRA model's
    model.safetensors (merged) and lora/ into the checkpoint's folder; None for a model without adapters."""
    if not has_adapters(model):
        return None
    from ..checkpoint import WEIGHTS_FILE, _write_weights

    def write(folder: Path) -> None:
        _write_weights(merged_state_dict(model), folder / WEIGHTS_FILE)
        write_adapters(model, folder / LORA_DIR)
        _write_weights(base_state_dict(model), folder / LORA_DIR / BASE_WEIGHTS)

    return write


def write_adapters(model: nn.Module, folder: Path) -> None:
    """peft's adapter folder of model's adapters (adapter_config.json, adapter_model.safetensors) into
    folder, for simplegpt's GPT (nn.Linear layers)."""
    from ..checkpoint import _write_weights

    config = model.peft_config[ADAPTER].to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set: the same file every time
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str), encoding="utf-8")
    state = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in adapter_parameters(model).items()}
    _write_weights(state, folder / ADAPTER_WEIGHTS)


def has_saved_adapters(path: str | os.PathLike) -> bool:
    """Whether the checkpoint folder at path holds lora/ (it was saved by a LoRA run)."""
    return (Path(path) / LORA_DIR / ADAPTER_CONFIG).is_file()


def restore_base(model: nn.Module, path: Path) -> None:
    """Give model (loaded from the LoRA checkpoint at path: merged weights) the exact base weights of
    its wrapped layers from lora/base.safetensors, in place. CheckpointError when they are missing
    or do not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / LORA_DIR / BASE_WEIGHTS
    try:
        base = load_file(str(file))
        tokens = saved_token_indices(file.parent)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} cannot be read ({e}); this LoRA checkpoint cannot be resumed") from None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in base.items():
            target, index = key, slice(None)
            if key.endswith(TOKEN_ROWS):  # the rows the run trained, as they were before it
                target, index = key.removesuffix(TOKEN_ROWS) + ".weight", tokens.get(key.removesuffix(TOKEN_ROWS))
            if target not in params or index is None or params[target][index].shape != value.shape:
                raise CheckpointError(f"{file} holds {key!r}, which does not fit the model; use another checkpoint")
            params[target][index] = value


def export_adapters(checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the adapters of the LoRA checkpoint as a peft adapter folder for the Hugging Face model that
    export-hf writes of its base: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE),
    out). A GPT2LMHeadModel keeps simplegpt's names (its Conv1D layers store (in, out): fan_in_fan_out
    true); a LlamaForCausalLM or Qwen3ForCausalLM gets them split into its own layers (hf_adapters).
    Trained token rows (trainable_token_indices) go with them. Atomic (temp dir + rename).
    CheckpointError for a checkpoint without adapters or a model no Hugging Face class has;
    OutputExistsError for an out that holds files."""
    from ..atomic import atomic_dir
    from ..checkpoint import _write_weights, read_checkpoint_config, read_whole, verify_files
    from ..errors import OutputExistsError
    from ..model import GPTConfig

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} already exists and is not empty; choose a new directory or pass --overwrite")

    def read(folder: Path) -> tuple[dict, dict]:
        from safetensors.torch import load_file

        if not has_saved_adapters(folder):
            raise CheckpointError(f"{checkpoint} holds no LoRA adapters (it was not trained with --lora); "
                                  "export-hf without --adapters-only writes its weights")
        verify_files(folder, read_checkpoint_config(folder), [f"{LORA_DIR}/{ADAPTER_CONFIG}",
                                                              f"{LORA_DIR}/{ADAPTER_WEIGHTS}"])
        config = json.loads((folder / LORA_DIR / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        return config, load_file(str(folder / LORA_DIR / ADAPTER_WEIGHTS))

    config, weights = read_whole(checkpoint, read)  # CheckpointError for a missing or damaged checkpoint
    model_config = GPTConfig.from_dict(read_checkpoint_config(checkpoint)["model"])
    if model_config.is_gpt2:
        config["fan_in_fan_out"] = True  # GPT-2's Conv1D stores (in, out), simplegpt's nn.Linear (out, in)
    else:
        config, weights = hf_adapters(config, weights, model_config)
    config["task_type"] = "CAUSAL_LM"
    with atomic_dir(out) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        _write_weights(weights, tmp / ADAPTER_WEIGHTS)
        os.chmod(tmp / ADAPTER_WEIGHTS, (tmp / ADAPTER_CONFIG).stat().st_mode & 0o777)
    return out


def hf_adapters(config: dict[str, Any], weights: dict[str, torch.Tensor],
                model_config: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A Llama-style model's adapter config and weights (simplegpt's names) for the LlamaForCausalLM or
    Qwen3ForCausalLM export-hf writes of it. A fused layer's adapter becomes one per Hugging Face layer
    with the same output: attn.c_attn (q | k | v rows) -> q_proj, k_proj, v_proj and mlp.c_fc (gate | up)
    -> gate_proj, up_proj, each with the shared A (rank, in) and its rows of B (out, rank), since
    B A x stacks the rows of each layer's output. The other layers and the trained token rows are
    renamed; target_modules and trainable_token_indices name Hugging Face's layers. CheckpointError
    for a model no Hugging Face class has (as export-hf)."""
    from .. import hf_llama

    hf_llama.hf_class_for(model_config)  # the options export-hf refuses are refused here too

    def hf_module(name: str) -> list[str]:  # simplegpt's module name -> Hugging Face's, in stacking order
        return [n.removesuffix(".weight") for n in hf_llama.hf_names(f"{name}.weight")]

    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        name = key.removeprefix(PEFT_PREFIX)
        if ".lora_" in name:  # MODULE.lora_A.weight (rank, in) or MODULE.lora_B.weight (out, rank)
            module, _, factor = name.partition(".lora_")
            if factor.startswith("A"):
                parts = {n: value.clone() for n in hf_module(module)}  # one copy each: safetensors shares none
            else:
                parts = {n.removesuffix(".weight"): p
                         for n, p in hf_llama.split_to_hf(f"{module}.weight", value, model_config).items()}
            out.update({f"{PEFT_PREFIX}{n}.lora_{factor}": p for n, p in parts.items()})
        else:  # LAYER.token_adapter.trainable_tokens_delta: a token layer's trained rows
            layer, _, rest = name.partition(".token_adapter.")
            out[f"{PEFT_PREFIX}{hf_module(layer)[0]}.token_adapter.{rest}"] = value
    suffixes = {s.removeprefix("model.layers.0.") for t in config["target_modules"]
                for s in hf_module(f"transformer.h.0.{t}")}
    tokens = config.get("trainable_token_indices") or {}
    config = {**config, "target_modules": sorted(suffixes),
              "trainable_token_indices": {hf_module(k)[0]: v for k, v in tokens.items()} or None}
    return config, out
