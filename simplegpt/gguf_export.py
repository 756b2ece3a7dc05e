"""A simplegpt checkpoint as one GGUF file, the format llama.cpp, Ollama and LM Studio read.

What goes in, and where it comes from:
- the architecture: the first entry of ARCHITECTURES that can express the model's config: GGUF's
  `gpt2` for GPT-2, `llama` for a Llama-style block (rotary positions, RMSNorm, SwiGLU; GQA, biases,
  an untied head, a head width of its own), `qwen3` for that block with QK-norm and no biases. An
  entry names the config values it requires, the fields it carries and its GGUF hyperparameters; a
  config option no entry expresses (ReLU^2, LayerNorm with rotary positions, ...) is refused, named;
- the tensors, under Hugging Face's names for the architecture (GPT-2's are simplegpt's own,
  Llama's and Qwen3's come from simplegpt.hf_llama's key map), renamed with the `gguf` package's own
  name map, as f32, f16 or Q8_0 in the format's block layout (gguf.quants); vectors, norms and
  learned positions stay f32, as llama.cpp's converter keeps them. GGUF's `llama` rotates adjacent
  pairs of a head's channels where simplegpt rotates its two halves, so its query and key rows are
  reordered (the permutation llama.cpp's converter applies to Hugging Face Llama weights);
- the tokenizer as GGUF's byte-level BPE vocabulary (simplegpt.gguf_vocab): its tokens in
  the byte-to-character alphabet, token types, merges and the pre-tokenizer's name
  (`tokenizer.ggml.pre`), which tells llama.cpp how to split text before the merges;
- the chat template, as `tokenizer.chat_template`, when the checkpoint's tokenizer carries one.

The file is written beside OUT under a hidden name, synced, then renamed onto OUT: a failure (a
full disk, Ctrl-C) leaves OUT as it was and no partial file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .atomic import make_parent, no_folders_left_on_failure
from .errors import (DISK_FULL, CheckpointError, FileAccessError, MissingDependencyError, OptionError,
                     OutputExistsError)
from .model import GPT, GPTConfig
from .gguf_vocab import Vocab, vocab_for
from .tokenizer import Tokenizer

INSTALL_HINT = 'install the GGUF extra: pip install "simplegpt-toolkit[gguf]"'
TYPES = ("f32", "f16", "q8_0")
# Q8_0 stores blocks of 32 values (one f16 scale + 32 int8) along each row: rows must be whole blocks.
Q8_0_BLOCK = 32
# A model at least this big (bytes of f32 weights) shows progress bars while it is converted and written.
PROGRESS_BYTES = 256 << 20


def require_gguf() -> ModuleType:
    """The `gguf` module, or a MissingDependencyError (an ImportError) naming the extra to install."""
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError(f"export-gguf needs the gguf package, which is not installed; "
                                     f"{INSTALL_HINT}") from None
    return gguf


@dataclass(frozen=True)
class Architecture:
    """One GGUF architecture simplegpt models can be written as.

    name: GGUF's `general.architecture`. requires: GPTConfig fields and the one value each must have
    (e.g. rotary positions). expresses: the other fields it carries (any field in neither must keep
    GPTConfig's default, else the model is not this architecture). hparams(config): its `{name}.*`
    keys, without the prefix, and their values. weights(model): the model's tensors under the Hugging
    Face names that the `gguf` package's name map knows for this architecture, fp32, in GGUF's layout.
    f32_tensors: GGUF tensor-name stems (after `blk.N.`) kept in f32 whatever the type, besides every
    vector."""

    name: str
    expresses: frozenset[str]
    hparams: Callable[[GPTConfig], dict[str, Any]]
    weights: Callable[[GPT], dict[str, torch.Tensor]]
    requires: tuple[tuple[str, Any], ...] = ()
    f32_tensors: frozenset[str] = frozenset()

    def cannot_express(self, config: GPTConfig) -> list[str]:
        """'field=value' for each config field this architecture has no way to write."""
        defaults = {f.name: f.default for f in dataclasses.fields(type(config))}
        required = dict(self.requires)
        return [f"{k}={v!r}" for k, v in config.to_dict().items()
                if (k in required and v != required[k])
                or (k not in required and k not in self.expresses and v != defaults.get(k, dataclasses.MISSING))]


def _gpt2_weights(model: GPT) -> dict[str, torch.Tensor]:
    """GPT-2's tensors (simplegpt's names are GPT2LMHeadModel's); a model without biases gets zero
    biases (GGUF's gpt2 requires them; a zero bias computes what no bias does)."""
    with torch.device("meta"):
        full = GPT(dataclasses.replace(model.config, bias=True)).state_dict()
    state = model.state_dict()
    return {name: state[name] if name in state else torch.zeros(meta.shape) for name, meta in full.items()}


def _llama_weights(model: GPT, rope_pairs: bool) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM / Qwen3ForCausalLM tensors (simplegpt.hf_llama's key map). Norms without a gain
    get a gain of ones (the same norm). rope_pairs: reorder each head's query and key rows so that
    the two halves Hugging Face rotates together (i, i + D/2) become adjacent rows (2i, 2i + 1), the
    pairs GGUF's `llama` rotates, as llama.cpp's converter does; `qwen3` rotates halves as we do."""
    from .hf_llama import to_hf_state

    config = dataclasses.replace(model.config, norm_gain=True)
    with torch.device("meta"):
        full = GPT(config).state_dict()
    state = model.state_dict()
    state = {name: state[name] if name in state else torch.ones(meta.shape) for name, meta in full.items()}
    hf = to_hf_state(state, config)
    if rope_pairs:
        D = config.head_dim
        for name, heads in (("q_proj", config.n_head), ("k_proj", config.kv_heads)):
            for key in [k for k in hf if f".self_attn.{name}." in k]:
                w = hf[key]  # (heads * D, ...) rows: per head, D/2 first-half rows then D/2 second-half rows
                hf[key] = w.reshape(heads, 2, D // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    return hf


def _gpt2_hparams(c: GPTConfig) -> dict[str, Any]:
    return {"context_length": c.n_positions, "embedding_length": c.n_embd, "feed_forward_length": 4 * c.n_embd,
            "block_count": c.n_layer, "attention.head_count": c.n_head,
            "attention.layer_norm_epsilon": c.layer_norm_epsilon}


def _llama_hparams(c: GPTConfig) -> dict[str, Any]:
    keys = {"vocab_size": c.vocab_size, "context_length": c.n_positions, "embedding_length": c.n_embd,
            "feed_forward_length": c.ffn_size, "block_count": c.n_layer, "attention.head_count": c.n_head,
            "attention.head_count_kv": c.kv_heads, "rope.dimension_count": c.head_dim,
            "rope.freq_base": float(c.rope_theta), "attention.layer_norm_rms_epsilon": c.rms_norm_eps}
    if c.head_dim * c.n_head != c.n_embd:  # llama.cpp's default head width is embedding_length / head_count
        keys.update({"attention.key_length": c.head_dim, "attention.value_length": c.head_dim})
    return keys


# Fields that change nothing for the architecture's block (an epsilon of a norm it does not use, the
# theta of rotary positions it does not have), so any value is expressed.
_UNUSED_BY_GPT2 = {"rope_theta", "rms_norm_eps"}
_UNUSED_BY_LLAMA = {"layer_norm_epsilon"}
# norm_gain=False is written as gains of ones, which compute the same
_LLAMA_FIELDS = frozenset({"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "dropout", "n_kv_head",
                           "head_size", "rope_theta", "norm_gain", "rms_norm_eps", "intermediate_size",
                           "tie_word_embeddings", *_UNUSED_BY_LLAMA})
_LLAMA_BLOCK = (("positions", "rotary"), ("norm", "rmsnorm"), ("mlp", "swiglu"))
GPT2 = Architecture(
    name="gpt2",
    # dropout does nothing at inference; bias=False is written as zero biases, which compute the same
    expresses=frozenset({"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "dropout", "bias",
                         "layer_norm_epsilon", *_UNUSED_BY_GPT2}),
    hparams=_gpt2_hparams,
    weights=_gpt2_weights,
    f32_tensors=frozenset({"position_embd"}),
)
# llama.cpp's llama reads optional biases on every linear layer; its qwen3 has none
LLAMA = Architecture(name="llama", expresses=_LLAMA_FIELDS | {"bias"},
                     requires=(*_LLAMA_BLOCK, ("qk_norm", False)),
                     hparams=_llama_hparams, weights=lambda m: _llama_weights(m, rope_pairs=True))
QWEN3 = Architecture(name="qwen3", expresses=_LLAMA_FIELDS,
                     requires=(*_LLAMA_BLOCK, ("qk_norm", True), ("bias", False)),
                     hparams=_llama_hparams, weights=lambda m: _llama_weights(m, rope_pairs=False))
ARCHITECTURES: tuple[Architecture, ...] = (GPT2, LLAMA, QWEN3)


def architecture_for(config: GPTConfig) -> Architecture:
    """The first architecture of ARCHITECTURES that expresses every field of config; CheckpointError
    (one line naming the fields) when none does."""
    reasons = []
    for arch in ARCHITECTURES:
        missing = arch.cannot_express(config)
        if not missing:
            return arch
        reasons.append(f"{arch.name} has no {', '.join(missing)}")
    raise CheckpointError(f"GGUF cannot express this model: {'; '.join(reasons)}")


def gguf_tensors(model: GPT, arch: Architecture) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 CPU tensor) of every weight the architecture reads (arch.weights), in the
    model's order. A tied output head is written once, as token_embd: llama.cpp reuses it without
    `output.weight`."""
    gguf = require_gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], model.config.n_layer)
    tied = model.lm_head.weight is model.transformer.wte.weight
    for name, tensor in arch.weights(model).items():
        if name == "lm_head.weight" and tied:
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise CheckpointError(f"GGUF's {arch.name} has no tensor for the weight {name!r}")
        yield gguf_name, tensor.detach().to("cpu", torch.float32).contiguous()


def _keeps_f32(arch: Architecture, name: str, tensor: torch.Tensor) -> bool:
    """Whether a tensor stays f32 whatever the type: vectors, and the architecture's f32_tensors."""
    return tensor.dim() < 2 or re.sub(r"^blk\.\d+\.", "", name).rsplit(".", 1)[0] in arch.f32_tensors


def _check_q8_0_rows(arch: Architecture, named: list[tuple[str, torch.Tensor]]) -> None:
    """OptionError unless every tensor to quantize has rows of whole Q8_0 blocks."""
    for name, tensor in named:
        if not _keeps_f32(arch, name, tensor) and tensor.shape[-1] % Q8_0_BLOCK:
            raise OptionError(f"--type q8_0 stores rows in blocks of {Q8_0_BLOCK} values and this model's {name} has "
                              f"rows of {tensor.shape[-1]}, not a multiple of {Q8_0_BLOCK}; use --type f16 or f32")


def _encode(gguf: ModuleType, arch: Architecture, name: str, tensor: torch.Tensor,
            qtype: str) -> tuple[np.ndarray, Any]:
    """A tensor's data as written (numpy array) and its GGML type (None: the array's own dtype)."""
    data = tensor.numpy()
    if qtype == "f32" or _keeps_f32(arch, name, tensor):
        return data, None
    if qtype == "f16":
        return data.astype(np.float16), None
    q8 = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(data, q8), q8


@dataclass
class GGUFExportResult:
    path: Path
    architecture: str
    type: str
    tensors: int
    bytes: int
    chat_template: bool  # True when the file carries tokenizer.chat_template


def export_gguf(checkpoint: str | os.PathLike, out: str | os.PathLike, type: str = "f32", overwrite: bool = False,
                progress: bool | None = None) -> GGUFExportResult:
    """Write a simplegpt checkpoint as the GGUF file `out` (see the module docstring).

    type: "f32", "f16" or "q8_0". overwrite: replace an existing `out` (otherwise refused).
    progress: tqdm bars on stderr while converting and writing; None shows them for models of
    PROGRESS_BYTES or more. Raises MissingDependencyError without the gguf package, OptionError for a
    type, CheckpointError for a model or tokenizer GGUF cannot express, OutputExistsError, and
    FileAccessError for a destination that cannot be written or a full disk (nothing is left at out)."""
    from .checkpoint import load_checkpoint

    _check_type(type)
    require_gguf()
    out = Path(out)
    _check_out(out, overwrite)
    ck = load_checkpoint(checkpoint)
    template = getattr(ck.tokenizer, "chat_template", None)  # stored with the tokenizer (simplegpt.chat)
    return write_gguf(ck.model, ck.tokenizer, out, type=type, chat_template=template,
                      name=Path(checkpoint).resolve().name, overwrite=overwrite, progress=progress)


def write_gguf(model: GPT, tokenizer: Tokenizer | None, out: str | os.PathLike, type: str = "f32",
               chat_template: str | None = None, name: str | None = None, overwrite: bool = False,
               progress: bool | None = None) -> GGUFExportResult:
    """Write a model and its tokenizer as the GGUF file `out`; arguments and errors as export_gguf."""
    gguf = require_gguf()
    _check_type(type)
    out = Path(out)
    _check_out(out, overwrite)
    config = model.config
    arch = architecture_for(config)
    vocab = vocab_for(tokenizer, config.vocab_size)
    if progress is None:
        progress = sum(p.numel() for p in model.parameters()) * 4 >= PROGRESS_BYTES
    from tqdm import tqdm

    tensors = []
    with torch.no_grad():
        named = list(gguf_tensors(model, arch))
        if type == "q8_0":
            _check_q8_0_rows(arch, named)
        for gguf_name, tensor in tqdm(named, desc="converting", unit="tensor", disable=not progress):
            tensors.append((gguf_name, *_encode(gguf, arch, gguf_name, tensor, type)))
    with _atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=arch.name)
        try:
            _add_metadata(gguf, writer, arch, config, vocab, type, chat_template, name or "simplegpt")
            for gguf_name, data, raw in tensors:
                writer.add_tensor(gguf_name, data, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=progress)
        finally:
            writer.close()
    return GGUFExportResult(path=out, architecture=arch.name, type=type, tensors=len(tensors),
                            bytes=out.stat().st_size, chat_template=chat_template is not None)


def _add_metadata(gguf: ModuleType, writer: Any, arch: Architecture, config: GPTConfig, vocab: Vocab, type: str,
                  chat_template: str | None, name: str) -> None:
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(name)
    for key, value in arch.hparams(config).items():
        if isinstance(value, float):
            writer.add_float32(f"{arch.name}.{key}", value)
        else:
            writer.add_uint32(f"{arch.name}.{key}", value)
    writer.add_file_type(file_types[type])
    if type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    # simplegpt's end-of-text token also opens a text, as GPT-2's does; nothing is added to prompts
    writer.add_bos_token_id(vocab.eos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _check_type(type: str) -> None:
    if type not in TYPES:
        raise OptionError(f"--type {type!r} is not a GGUF type export-gguf writes; choose one of {', '.join(TYPES)}")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise OutputExistsError(f"{out} is a directory; give the path of the .gguf file to write")
    if out.exists() and not out.is_file():  # a device or a pipe: --overwrite would put a file in its place
        raise OutputExistsError(f"{out} is not a regular file; give the path of the .gguf file to write")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; choose a new file or pass --overwrite")


@contextlib.contextmanager
def _atomic_file(out: Path) -> Iterator[Path]:
    """A hidden temporary path beside out; when the block ends normally it is synced and renamed onto
    out, otherwise removed. OSError becomes a FileAccessError naming out (a full disk said as such)."""
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    full = False
    try:
        with no_folders_left_on_failure(out.parent):
            make_parent(out)
            try:
                yield tmp
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, out)
            except BaseException as e:
                # numpy's tofile reports a short write ("N requested and M written") without its errno
                full = isinstance(e, OSError) and (e.errno in DISK_FULL or (e.errno is None and _no_room(tmp)))
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
    except OSError as e:
        if full:
            raise FileAccessError(f"the disk of {out} is full ({os.strerror(errno.ENOSPC)}); nothing was written: "
                                  "free some space and export again") from e
        raise FileAccessError(f"{out}: cannot be written ({e.strerror or e})") from e
    if os.name != "nt":  # the rename reaches the disk (Windows cannot open a folder to sync it)
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _no_room(file: Path) -> bool:
    """Whether one more byte written to file fails for want of space."""
    try:
        with open(file, "ab", buffering=0) as f:
            f.write(b"\0")
            os.fsync(f.fileno())
    except OSError as e:
        return e.errno in DISK_FULL
    return False
