"""A GGUF file of GGUF's `gpt2`, `llama` or `qwen3` architecture as a simplegpt checkpoint: the way
back of export-gguf.

The tensors are read with the `gguf` package's reader and dequantized with its own `gguf.quants`
(f16 and Q8_0 files come back as float32, with their rounding); the names go through the same name
map as the export (for `llama` and `qwen3`, to Hugging Face's names and then through
simplegpt.hf_llama's key map; `llama`'s query and key rows go back from rotation pairs to halves).
The tokenizer comes back as what it was where the vocabulary says so (GPT-2's,
bytes, characters), else as a byte-level BPE built with `tokenizers` from the tokens, merges and
pre-tokenizer name; the chat template goes with the tokenizer (its `chat_template`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoint, model_from_state, save_checkpoint
from .errors import CheckpointError, OutputExistsError
from .hf_tokenizer import HFTokenizer, _byte_decoder, as_hf_tokenizer
from .gguf_export import GPT2, LLAMA, QWEN3, require_gguf
from .gguf_vocab import GPT2_PRE, INERT_MERGES, PRE_TOKENIZERS, _byte_chars, char_merges
from .model import GPT, GPTConfig
from .tokenizer import EOS_TEXT, ByteTokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer, gpt2_vocab_files


def read_gguf(path: str | os.PathLike) -> Checkpoint:
    """The model, tokenizer and chat template of a GGUF file (Checkpoint with path=None).
    CheckpointError, one line, for a file that is not GGUF, another architecture than gpt2, llama
    or qwen3, or a model or vocabulary simplegpt cannot run exactly."""
    gguf = require_gguf()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; give the path of a .gguf file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:  # the reader's errors for a file that is not GGUF
        raise CheckpointError(f"{path} is not a readable GGUF file ({e})") from None
    fields = {k: f.contents() for k, f in reader.fields.items()}
    arch = fields.get("general.architecture")
    if arch == GPT2.name:
        config = _config(fields, path)
        state = _state(gguf, reader, config, path)
    elif arch in (LLAMA.name, QWEN3.name):
        tensors = {t.name: t for t in reader.tensors}
        config = _llama_config(fields, arch, tensors, path)
        state = _llama_state(gguf, tensors, config, arch, path)
    else:
        known = ", ".join(repr(a.name) for a in (GPT2, LLAMA, QWEN3))
        raise CheckpointError(f"{path} holds a {arch!r} model; import-gguf reads GGUF's {known} architectures")
    tokenizer = _tokenizer(fields, config.vocab_size, path)
    metadata: dict[str, Any] = {"imported_from": str(path)}
    template = fields.get("tokenizer.chat_template")
    if isinstance(template, str):  # the template lives on the tokenizer, as simplegpt.chat keeps it
        try:
            tokenizer = as_hf_tokenizer(tokenizer)
        except ValueError as e:
            raise CheckpointError(f"{path} has a chat template but a vocabulary that cannot hold one: {e}") from None
        tokenizer = HFTokenizer(tokenizer.json, tokenizer.eos_id, kind=tokenizer.kind, chat_template=template)
    return Checkpoint(model=model_from_state(config, state).eval(), tokenizer=tokenizer, config=config,
                      metadata=metadata, path=None)


def import_gguf(source: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Checkpoint:
    """Convert a GGUF file into a simplegpt checkpoint directory at `out` (written atomically)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} already exists and is not empty; choose a new directory or pass --overwrite")
    ck = read_gguf(source)
    ck.path = save_checkpoint(out, ck.model, ck.tokenizer, metadata=ck.metadata)
    return ck


def _config(fields: dict[str, Any], path: Path) -> GPTConfig:
    key = f"{GPT2.name}."
    try:
        n_embd = int(fields[key + "embedding_length"])
        n_ff = int(fields.get(key + "feed_forward_length", 4 * n_embd))
        config = GPTConfig(vocab_size=len(fields["tokenizer.ggml.tokens"]),
                         n_positions=int(fields[key + "context_length"]), n_embd=n_embd,
                         n_layer=int(fields[key + "block_count"]),
                         n_head=int(fields[key + "attention.head_count"]), dropout=0.0, bias=True,
                         layer_norm_epsilon=_float(fields[key + "attention.layer_norm_epsilon"]))
    except KeyError as e:
        raise CheckpointError(f"{path} has no {e.args[0]}; it is not a complete GGUF gpt2 model") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid gpt2 configuration: {e}") from None
    if n_ff != 4 * n_embd:
        raise CheckpointError(f"{path} has feed_forward_length {n_ff}; simplegpt's GPT-2 uses 4 * embedding_length "
                              f"({4 * n_embd})")
    return config


def _llama_config(fields: dict[str, Any], arch: str, tensors: dict[str, Any], path: Path) -> GPTConfig:
    """The GPTConfig of a llama or qwen3 file's hyperparameters; CheckpointError for what simplegpt's
    Llama-style block has not (rope scaling, partial rotation, keys and values of different widths)."""
    key = f"{arch}."
    try:
        n_embd, n_head = int(fields[key + "embedding_length"]), int(fields[key + "attention.head_count"])
        head_dim = int(fields.get(key + "attention.key_length", n_embd // n_head))
        unsupported = []
        if int(fields.get(key + "attention.value_length", head_dim)) != head_dim:
            unsupported.append("values and keys of different widths")
        if int(fields.get(key + "rope.dimension_count", head_dim)) != head_dim:
            unsupported.append("rotary positions on part of each head")
        if fields.get(key + "rope.scaling.type") not in (None, "none"):
            unsupported.append(f"rope scaling {fields[key + 'rope.scaling.type']!r}")
        if unsupported:
            raise CheckpointError(f"{path} is a {arch} model simplegpt cannot run exactly: {'; '.join(unsupported)}")
        embedding = tensors.get("token_embd.weight")
        vocab = int(embedding.shape[1]) if embedding is not None else len(fields["tokenizer.ggml.tokens"])
        return GPTConfig(
            vocab_size=vocab, n_positions=int(fields[key + "context_length"]), n_embd=n_embd,
            n_layer=int(fields[key + "block_count"]), n_head=n_head,
            n_kv_head=int(fields.get(key + "attention.head_count_kv", n_head)),
            head_size=None if head_dim * n_head == n_embd else head_dim, dropout=0.0,
            bias="blk.0.attn_q.bias" in tensors, positions="rotary",
            rope_theta=_float(fields.get(key + "rope.freq_base", 10000.0)), norm="rmsnorm",
            rms_norm_eps=_float(fields[key + "attention.layer_norm_rms_epsilon"]), mlp="swiglu",
            intermediate_size=int(fields[key + "feed_forward_length"]), qk_norm=arch == QWEN3.name,
            tie_word_embeddings="output.weight" not in tensors)
    except KeyError as e:
        raise CheckpointError(f"{path} has no {e.args[0]}; it is not a complete GGUF {arch} model") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid {arch} configuration: {e}") from None


def _float(value: Any) -> float:
    """A float32 hyperparameter as the shortest decimal that is that float32 (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _llama_state(gguf: Any, tensors: dict[str, Any], config: GPTConfig, arch: str,
                 path: Path) -> dict[str, torch.Tensor]:
    """simplegpt weights from a llama or qwen3 file's tensors (dequantized to float32), checked by
    simplegpt.hf_llama.from_hf_state against config."""
    from .hf_llama import _expected, from_hf_state, hf_names

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.n_layer)
    hf_state: dict[str, torch.Tensor] = {}
    for name in _expected(config):
        for hf_name in hf_names(name):
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name in tensors:
                hf_state[hf_name] = _float32(gguf, tensors.pop(gguf_name))
    if config.tie_word_embeddings and "output.weight" in tensors:
        hf_state["lm_head.weight"] = _float32(gguf, tensors.pop("output.weight"))
    if tensors:
        raise CheckpointError(f"{path} holds tensors simplegpt's {arch} has not: {sorted(tensors)[:3]}")
    if arch == LLAMA.name:  # rotation pairs (2i, 2i + 1) back to halves (i, i + D/2), see gguf_export
        D = config.head_dim
        for proj, heads in (("q_proj", config.n_head), ("k_proj", config.kv_heads)):
            for key in [k for k in hf_state if f".self_attn.{proj}." in k]:
                w = hf_state[key]
                if w.shape[0] != heads * D:
                    raise CheckpointError(f"{path}: {key} has {w.shape[0]} rows but its hyperparameters imply "
                                          f"{heads * D}")
                hf_state[key] = w.reshape(heads, D // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    return from_hf_state(hf_state, config, str(path))


def _state(gguf: Any, reader: Any, config: GPTConfig, path: Path) -> dict[str, torch.Tensor]:
    """simplegpt weights from the file's tensors (dequantized to float32), checked against config."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config.n_layer)
    tensors = {t.name: t for t in reader.tensors}
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, meta in expected.items():
        if name == "lm_head.weight":
            continue  # tied: output.weight, when present, is checked below
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name not in tensors:
            raise CheckpointError(f"{path} has no tensor {gguf_name}; it is not a complete gpt2 model")
        state[name] = _float32(gguf, tensors.pop(gguf_name))
        if tuple(state[name].shape) != tuple(meta.shape):
            raise CheckpointError(f"{path}: {gguf_name} has shape {tuple(state[name].shape)} but its hyperparameters "
                                  f"imply {tuple(meta.shape)}")
    head = tensors.pop("output.weight", None)
    if head is not None and not torch.equal(_float32(gguf, head), state["transformer.wte.weight"]):
        raise CheckpointError(f"{path} has an output head different from its token embedding; simplegpt models tie "
                              "them, so it cannot be imported exactly")
    if tensors:
        raise CheckpointError(f"{path} holds tensors gpt2 does not have: {sorted(tensors)[:3]}")
    return state


def _float32(gguf: Any, tensor: Any) -> torch.Tensor:
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(data.astype("float32", copy=True)).reshape(tuple(reversed([int(d) for d in tensor.shape])))


def _tokenizer(fields: dict[str, Any], vocab_size: int, path: Path) -> Tokenizer:
    """simplegpt's tokenizer for the file's vocabulary (see the module docstring)."""
    if fields.get("tokenizer.ggml.model") != "gpt2":
        raise CheckpointError(f"{path} has a {fields.get('tokenizer.ggml.model')!r} vocabulary; import-gguf reads "
                              "byte-level BPE ('gpt2') vocabularies")
    tokens, merges = fields["tokenizer.ggml.tokens"], fields.get("tokenizer.ggml.merges") or []
    types = fields.get("tokenizer.ggml.token_type") or [1] * vocab_size
    unused = int(require_gguf().TokenType.UNUSED)
    while len(tokens) > 1 and types[len(tokens) - 1] == unused:  # the padding of an embedding past its tokenizer
        tokens, types = tokens[:-1], types[:-1]
    eos_id = int(fields.get("tokenizer.ggml.eos_token_id", vocab_size - 1))
    encoder, bpe = gpt2_vocab_files()
    ids = json.loads(encoder.read_text(encoding="utf-8"))
    gpt2_merges = [line for line in bpe.read_text(encoding="utf-8").splitlines()[1:] if line]
    if tokens == sorted(ids, key=ids.__getitem__) and merges == gpt2_merges:
        return GPT2Tokenizer()
    if tokens[-1] == EOS_TEXT and eos_id == len(tokens) - 1:
        if merges == INERT_MERGES and tokens[:-1] == _byte_chars():
            return ByteTokenizer()
        chars = [_one_char(t) for t in tokens[:-1]]
        # a character vocabulary, in its own order, with the merges export-gguf writes for it
        if None not in chars and chars == sorted(set(chars)) and merges == char_merges(chars):
            return CharTokenizer(chars)
    return _hf_bpe(tokens, types, merges, fields.get("tokenizer.ggml.pre", GPT2_PRE), eos_id, path)


def _one_char(token: str) -> str | None:
    """The one character a byte-level token spells, or None (bytes that are not one UTF-8 character)."""
    decoder = _byte_decoder()
    try:
        text = bytes(decoder[c] for c in token).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return None
    return text if len(text) == 1 else None


def _hf_bpe(tokens: list[str], types: list[int], merges: list[str], pre: str, eos_id: int, path: Path) -> Tokenizer:
    """A byte-level BPE with these tokens and merges, split as llama.cpp's `pre` names."""
    from tokenizers import AddedToken, Regex
    from tokenizers import Tokenizer as HFT
    from tokenizers import decoders, models, pre_tokenizers

    from .hf_tokenizer import HFTokenizer

    patterns = {name: pattern for pattern, name in PRE_TOKENIZERS.items()}
    if pre not in patterns:
        raise CheckpointError(f"{path} splits text as llama.cpp's {pre!r} pre-tokenizer, which import-gguf does not "
                              f"know (known: {', '.join(sorted(patterns))})")
    tok = HFT(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                         merges=[tuple(m.split(" ", 1)) for m in merges if m not in INERT_MERGES]))
    if pre == GPT2_PRE:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(patterns[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    gguf = require_gguf()
    control, user_defined = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
    tok.add_tokens([AddedToken(t, special=(k == control), normalized=False)
                    for t, k in zip(tokens, types) if k in (control, user_defined)])
    return HFTokenizer(tok.to_str(), eos_id=eos_id, kind="hf")

