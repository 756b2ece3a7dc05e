"""Llama-style models to and from Hugging Face's LlamaForCausalLM and Qwen3ForCausalLM, exactly.

simplegpt keeps GPT-2's module names for every option (simplegpt.model), so a Llama-style block's
q/k/v projections are one matrix (attn.c_attn) and SwiGLU's gate and up projections another
(mlp.c_fc). The key map is one table of rules: a simplegpt name and the Hugging Face names whose
tensors, stacked along the output dimension in that order, make it. nn.Linear stores (out, in) in
both formats, and both rotate a head's two halves (rotate_half), so nothing is transposed or
permuted: a round trip keeps every tensor bit-identical.

A config maps onto a Hugging Face class when it has rotary positions, RMSNorm with a gain and a
SwiGLU MLP: with QK-norm it is a Qwen3ForCausalLM (no biases), without one a LlamaForCausalLM
(biases on every linear or none). Other options have no class and are refused, naming them.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .errors import CheckpointError
from .model import GPT, GPTConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_LAYER = "model.layers.{0}."
# (simplegpt name pattern, Hugging Face names; {0} = layer, {1} = weight or bias)
KEY_MAP: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"transformer\.wte\.weight", ("model.embed_tokens.weight",)),
    (r"transformer\.h\.(\d+)\.ln_1\.weight", (_LAYER + "input_layernorm.weight",)),
    (r"transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)",
     (_LAYER + "self_attn.q_proj.{1}", _LAYER + "self_attn.k_proj.{1}", _LAYER + "self_attn.v_proj.{1}")),
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.(weight|bias)", (_LAYER + "self_attn.o_proj.{1}",)),
    (r"transformer\.h\.(\d+)\.attn\.q_norm\.weight", (_LAYER + "self_attn.q_norm.weight",)),
    (r"transformer\.h\.(\d+)\.attn\.k_norm\.weight", (_LAYER + "self_attn.k_norm.weight",)),
    (r"transformer\.h\.(\d+)\.ln_2\.weight", (_LAYER + "post_attention_layernorm.weight",)),
    (r"transformer\.h\.(\d+)\.mlp\.c_fc\.(weight|bias)", (_LAYER + "mlp.gate_proj.{1}", _LAYER + "mlp.up_proj.{1}")),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.(weight|bias)", (_LAYER + "mlp.down_proj.{1}",)),
    (r"transformer\.ln_f\.weight", ("model.norm.weight",)),
    (r"lm_head\.weight", ("lm_head.weight",)),
)
_RULES = tuple((re.compile(pattern), names) for pattern, names in KEY_MAP)


def hf_names(name: str) -> tuple[str, ...]:
    """The Hugging Face tensors that make simplegpt's tensor `name`, in stacking order (KeyError if none)."""
    for regex, names in _RULES:
        if m := regex.fullmatch(name):
            groups = m.groups() + ("weight",) * (2 - len(m.groups()))
            return tuple(n.format(*groups) if m.groups() else n for n in names)
    raise KeyError(name)


def _split_sizes(names: tuple[str, ...], config: GPTConfig) -> list[int]:
    """The output rows of each Hugging Face tensor in a stacked simplegpt tensor."""
    if len(names) == 3:  # q | k | v
        return [config.n_head * config.head_dim, config.kv_heads * config.head_dim, config.kv_heads * config.head_dim]
    return [config.ffn_size] * len(names)  # gate | up


def _expected(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """simplegpt's tensor names and shapes for config (a tied head left out), built on the meta device."""
    with torch.device("meta"):
        state = GPT(config).state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}


def split_to_hf(name: str, tensor: torch.Tensor, config: GPTConfig) -> dict[str, torch.Tensor]:
    """simplegpt's tensor `name` (out, ...) as the Hugging Face tensors that make it: its rows split in
    stacking order (q | k | v, gate | up), or itself under its one name. KeyError for an unknown name."""
    names = hf_names(name)
    parts = tensor.split(_split_sizes(names, config)) if len(names) > 1 else (tensor,)
    return {n: p.contiguous() for n, p in zip(names, parts)}


def to_hf_state(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """simplegpt weights (a tied head left out) -> LlamaForCausalLM / Qwen3ForCausalLM weights."""
    out: dict[str, torch.Tensor] = {}
    for name in _expected(config):
        if name not in state:
            raise CheckpointError(f"the checkpoint has no weight {name!r}; it does not match its config")
        out.update(split_to_hf(name, state[name], config))
    return out


def from_hf_state(hf_state: dict[str, torch.Tensor], config: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM / Qwen3ForCausalLM weights -> simplegpt weights, checking names and shapes
    against config. A tied model's file may hold lm_head.weight too; it must then equal the embedding."""
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}  # old files' buffers
    layers = {int(m[1]) for key in hf_state if (m := re.match(r"model\.layers\.(\d+)\.", key))}
    # before anything is built (and without a set of n_layer numbers): a config.json may name any number
    if len(layers) != config.n_layer or layers != set(range(len(layers))):
        raise CheckpointError(f"{where}: its config.json has num_hidden_layers={config.n_layer} but the weights hold "
                              f"{len(layers)} layers; config and weights do not match")
    expected = _expected(config)
    used: set[str] = set()
    state: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        names = hf_names(name)
        missing = [n for n in names if n not in hf_state]
        if missing:
            raise CheckpointError(f"{where} is missing weight {missing[0]!r}; the weights file is incomplete or "
                                  "does not match its config.json")
        tensor = torch.cat([hf_state[n] for n in names]) if len(names) > 1 else hf_state[names[0]]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{where}: weight {names[0]!r} does not have the shape its config.json implies "
                                  f"({'+'.join(names)} is {list(tensor.shape)}, expected {list(shape)})")
        state[name] = tensor
        used.update(names)
    head = hf_state.get("lm_head.weight")
    if config.tie_word_embeddings and head is not None:
        if not torch.equal(head.to(state["transformer.wte.weight"].dtype), state["transformer.wte.weight"]):
            raise CheckpointError(f"{where}: its config.json says tie_word_embeddings but lm_head.weight differs "
                                  "from the token embedding; config and weights do not match")
        used.add("lm_head.weight")
    extra = sorted(set(hf_state) - used)
    if extra:
        raise CheckpointError(f"{where} holds weight(s) {extra[:3]} that its config.json's model has not; config "
                              "and weights do not match")
    return state


# What transformers' LlamaConfig and Qwen3Config take for a key a config.json leaves out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6),
}


def _rope(hf: dict[str, Any]) -> tuple[float, str]:
    """rope_theta and the rope type of a config.json (transformers 5's rope_parameters or the older keys)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type") or "default"
    return theta, kind


def config_from_hf(hf: dict[str, Any], where: str) -> GPTConfig:
    """A GPTConfig from a LlamaForCausalLM or Qwen3ForCausalLM config.json (model_type "llama" or
    "qwen3"); CheckpointError naming what simplegpt cannot run exactly."""
    kind = hf.get("model_type")
    unsupported = []
    theta, rope_type = _rope(hf)
    if rope_type != "default":
        unsupported.append(f"rope scaling {rope_type!r} (simplegpt has plain rotary positions)")
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']!r} (SwiGLU uses silu)")
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        unsupported.append(f"attention_bias={attention_bias} with mlp_bias={mlp_bias} (simplegpt's bias is one "
                           "switch for every linear layer)")
    if kind == "qwen3" and (hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types")
                                                                   or [])):
        unsupported.append("sliding-window attention layers")
    if hf.get("pretraining_tp", 1) not in (1, None):
        unsupported.append(f"pretraining_tp={hf['pretraining_tp']}")
    if unsupported:
        raise CheckpointError(f"{where} is a {ARCHITECTURES[kind]} variant simplegpt cannot run exactly: "
                              f"{'; '.join(unsupported)}")
    hf = {**_DEFAULTS[kind], **hf}
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"], n_positions=hf["max_position_embeddings"], n_embd=n_embd,
            n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
            head_size=None if head_dim in (None, n_embd // n_head) and n_embd % n_head == 0 else head_dim,
            dropout=float(hf.get("attention_dropout", 0.0)), bias=attention_bias, positions="rotary",
            rope_theta=float(theta), norm="rmsnorm", rms_norm_eps=float(hf["rms_norm_eps"]), mlp="swiglu",
            intermediate_size=hf["intermediate_size"], qk_norm=kind == "qwen3",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where} has an invalid {ARCHITECTURES[kind]} config: {e}") from None


def hf_class_for(config: GPTConfig) -> str:
    """"llama" or "qwen3": the model_type a config that is not GPT-2's exports as. CheckpointError
    naming each option that no Hugging Face class has."""
    if config.positions == "learned":  # only GPT2LMHeadModel has learned positions: say what is not GPT-2's
        differ = [f"norm={config.norm!r}" if config.norm != "layernorm" else "",
                  "norm_gain=false" if not config.norm_gain else "",
                  f"mlp={config.mlp!r}" if config.mlp != "gelu" else "",
                  f"n_kv_head={config.kv_heads}" if config.kv_heads != config.n_head else "",
                  f"head_dim={config.head_dim}" if config.head_dim * config.n_head != config.n_embd else "",
                  f"intermediate_size={config.ffn_size}" if config.ffn_size != 4 * config.n_embd else "",
                  "qk_norm=true" if config.qk_norm else "",
                  "tie_word_embeddings=false" if not config.tie_word_embeddings else ""]
        raise CheckpointError("this model has no Hugging Face class to export to: learned positions are GPT-2's, "
                              f"and GPT2LMHeadModel has no {', '.join(d for d in differ if d)}")
    why = []
    if config.norm != "rmsnorm":
        why.append(f"norm={config.norm!r} (Llama and Qwen3 use rmsnorm)")
    if not config.norm_gain:
        why.append("norm_gain=false (Llama and Qwen3 norms have a gain)")
    if config.mlp != "swiglu":
        why.append(f"mlp={config.mlp!r} (Llama and Qwen3 use swiglu)")
    if config.qk_norm and config.bias:
        why.append("qk_norm with bias=true (Qwen3's MLP has no biases)")
    if why:
        raise CheckpointError("this model has no Hugging Face class to export to: " + "; ".join(why))
    return "qwen3" if config.qk_norm else "llama"


def config_to_hf(config: GPTConfig, kind: str, eos_id: int, bos_id: int) -> dict[str, Any]:
    """The config.json LlamaForCausalLM / Qwen3ForCausalLM.from_pretrained reads (kind from hf_class_for)."""
    doc: dict[str, Any] = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.ffn_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.n_positions,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "attention_bias": config.bias,
        "attention_dropout": config.dropout,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "dtype": "float32",
    }
    if kind == "llama":
        doc.update(mlp_bias=config.bias, pretraining_tp=1)
    else:
        doc.update(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * config.n_layer)
    return doc
