"""A GGUF file of GGUF's `gpt2` architecture as a simplegpt checkpoint: the way back of export-gguf.

The tensors are read with the `gguf` package's reader and dequantized with its own `gguf.quants`
(f16 and Q8_0 files come back as float32, with their rounding); the names go through the same name
map as the export. The tokenizer comes back as what it was where the vocabulary says so (GPT-2's,
bytes, characters), else as a byte-level BPE built with `tokenizers` from the tokens, merges and
pre-tokenizer name; the chat template goes with the tokenizer (its `chat_template`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, model_from_state, save_checkpoint
from .errors import CheckpointError, OutputExistsError
from .hf_tokenizer import HFTokenizer, as_hf_tokenizer
from .gguf_export import (GPT2, GPT2_PRE, INERT_MERGES, PRE_TOKENIZERS, _byte_chars,
                          require_gguf)
from .model import GPT, GPTConfig
from .tokenizer import EOS_TEXT, ByteTokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer, gpt2_vocab_files


def read_gguf(path: str | os.PathLike) -> Checkpoint:
    """The model, tokenizer and chat template of a GGUF file (Checkpoint with path=None).
    CheckpointError, one line, for a file that is not GGUF, another architecture than gpt2, or a
    model or vocabulary simplegpt cannot run exactly."""
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
    if arch != GPT2.name:
        raise CheckpointError(f"{path} holds a {arch!r} model; import-gguf reads GGUF's {GPT2.name!r} architecture")
    config = _config(fields, path)
    state = _state(gguf, reader, config, path)
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
                         layer_norm_epsilon=float(fields[key + "attention.layer_norm_epsilon"]))
    except KeyError as e:
        raise CheckpointError(f"{path} has no {e.args[0]}; it is not a complete GGUF gpt2 model") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid gpt2 configuration: {e}") from None
    if n_ff != 4 * n_embd:
        raise CheckpointError(f"{path} has feed_forward_length {n_ff}; simplegpt's GPT-2 uses 4 * embedding_length "
                              f"({4 * n_embd})")
    return config


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
    eos_id = int(fields.get("tokenizer.ggml.eos_token_id", vocab_size - 1))
    encoder, bpe = gpt2_vocab_files()
    ids = json.loads(encoder.read_text(encoding="utf-8"))
    gpt2_merges = [line for line in bpe.read_text(encoding="utf-8").splitlines()[1:] if line]
    if tokens == sorted(ids, key=ids.__getitem__) and merges == gpt2_merges:
        return GPT2Tokenizer()
    byte_chars = _byte_chars()
    if merges == INERT_MERGES and tokens[-1] == EOS_TEXT and eos_id == len(tokens) - 1:
        if tokens[:-1] == byte_chars:
            return ByteTokenizer()
        ascii_chars = {c: chr(b) for b, c in enumerate(byte_chars[:128])}
        chars = [ascii_chars.get(t) for t in tokens[:-1]]
        if None not in chars and chars == sorted(set(chars)):  # a character vocabulary, in its own order
            return CharTokenizer(chars)
    return _hf_bpe(tokens, types, merges, fields.get("tokenizer.ggml.pre", GPT2_PRE), eos_id, path)


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

