"""A simplegpt checkpoint as one GGUF file, the format llama.cpp, Ollama and LM Studio read.

What goes in, and where it comes from:
- the architecture: the first entry of ARCHITECTURES that can express the model's config (today
  GGUF's `gpt2`; an entry names its GGUF hyperparameters and which config fields it expresses, so
  a Llama-style entry is one more row). A config option no entry expresses is refused, named;
- the tensors, renamed with the `gguf` package's own name map for that architecture (simplegpt's
  state-dict names are Hugging Face GPT-2's), as f32, f16 or Q8_0 in the format's block layout
  (gguf.quants); vectors, norms and learned positions stay f32, as llama.cpp's converter keeps them;
- the tokenizer as GGUF's byte-level BPE vocabulary (`tokenizer.ggml.model` "gpt2"): its tokens in
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
import json
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
from .tokenizer import EOS_TEXT, ByteTokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer, gpt2_vocab_files

INSTALL_HINT = 'install the GGUF extra: pip install "simplegpt-toolkit[gguf]"'
TYPES = ("f32", "f16", "q8_0")
# The checkpoint metadata key (config.json) holding a Jinja chat template in Hugging Face's convention.
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

    name: GGUF's `general.architecture`. expresses: the GPTConfig fields it carries (any other field
    must keep GPTConfig's default, else the model is not this architecture). hparams(config): its
    `{name}.*` keys, without the prefix, and their values. f32_tensors: GGUF tensor-name stems
    (after `blk.N.`) kept in f32 whatever the type, besides every vector."""

    name: str
    expresses: frozenset[str]
    hparams: Callable[[GPTConfig], dict[str, Any]]
    f32_tensors: frozenset[str] = frozenset()

    def cannot_express(self, config: GPTConfig) -> list[str]:
        """'field=value' for each config field this architecture has no way to write."""
        defaults = {f.name: f.default for f in dataclasses.fields(type(config))}
        return [f"{k}={v!r}" for k, v in config.to_dict().items()
                if k not in self.expresses and v != defaults.get(k, dataclasses.MISSING)]


GPT2 = Architecture(
    name="gpt2",
    # dropout does nothing at inference; bias=False is written as zero biases, which compute the same
    expresses=frozenset({"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "dropout", "bias",
                         "layer_norm_epsilon"}),
    hparams=lambda c: {"context_length": c.n_positions, "embedding_length": c.n_embd,
                       "feed_forward_length": 4 * c.n_embd, "block_count": c.n_layer,
                       "attention.head_count": c.n_head, "attention.layer_norm_epsilon": c.layer_norm_epsilon},
    f32_tensors=frozenset({"position_embd"}),
)
ARCHITECTURES: tuple[Architecture, ...] = (GPT2,)


def architecture_for(config: GPTConfig) -> Architecture:
    """The first architecture of ARCHITECTURES that expresses every field of config; CheckpointError
    (one line naming the fields) when none does."""
    reasons = []
    for arch in ARCHITECTURES:
        missing = arch.cannot_express(config)
        if not missing:
            return arch
        reasons.append(f"{arch.name} has no {', '.join(missing)}")
    raise CheckpointError(f"GGUF cannot express this model: {'; '.join(reasons)}; export-hf writes it for "
                          "transformers instead")


@dataclass
class Vocab:
    """A tokenizer as GGUF's BPE vocabulary: tokens[i] is id i in the byte-level alphabet."""

    tokens: list[str]
    types: list[int]  # gguf.TokenType per token
    merges: list[str]  # "left right", in rank order
    pre: str  # tokenizer.ggml.pre: how llama.cpp splits text before merging
    eos_id: int


# Pre-tokenizer regexes of byte-level BPE tokenizer.json files -> llama.cpp's name for that split.
PRE_TOKENIZERS = {
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}
GPT2_PRE = "gpt-2"
# A vocabulary of single characters has no merges, but llama.cpp refuses a BPE vocabulary without the
# merges key and the gguf package writes no empty array: the one merge written joins two end-of-text
# tokens, which never occur as BPE symbols (llama.cpp's merges start from single characters, and
# control tokens are matched apart from BPE), so it never applies.
INERT_MERGES = [f"{EOS_TEXT} {EOS_TEXT}"]


def _byte_chars() -> list[str]:
    """The byte-level alphabet: byte b -> the printable character that stands for it in BPE vocabularies."""
    from .hf_tokenizer import _byte_decoder

    chars = [""] * 256
    for char, b in _byte_decoder().items():
        chars[b] = char
    return chars


def vocab_for(tok: Tokenizer | None, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of a simplegpt tokenizer. CheckpointError, one line saying why and what to
    use instead, for a tokenizer llama.cpp would not split exactly as simplegpt does."""
    gguf = require_gguf()
    normal, control = int(gguf.TokenType.NORMAL), int(gguf.TokenType.CONTROL)
    if tok is None:
        raise CheckpointError("the checkpoint has no tokenizer, and a GGUF file must carry one; save the "
                              "checkpoint with its tokenizer (prepare/train do)")
    if isinstance(tok, GPT2Tokenizer):
        encoder, bpe = gpt2_vocab_files()
        ids = json.loads(encoder.read_text(encoding="utf-8"))
        tokens = sorted(ids, key=ids.__getitem__)
        merges = [line for line in bpe.read_text(encoding="utf-8").splitlines()[1:] if line]  # after "#version"
        vocab = Vocab(tokens, [control if t == EOS_TEXT else normal for t in tokens], merges, GPT2_PRE, tok.eos_id)
    elif isinstance(tok, ByteTokenizer):
        # 256 one-byte tokens and no merges that apply: llama.cpp's BPE maps each byte of the text to
        # its character, and with no merges each character is its own token, the byte's id
        vocab = Vocab([*_byte_chars(), EOS_TEXT], [normal] * 256 + [control], INERT_MERGES, GPT2_PRE, tok.eos_id)
    elif isinstance(tok, CharTokenizer):
        vocab = _char_vocab(tok, normal, control)
    elif tok.kind in ("bpe", "hf"):
        vocab = _hf_vocab(tok, normal, control, int(gguf.TokenType.USER_DEFINED))
    else:
        raise CheckpointError(f"GGUF has no vocabulary for simplegpt's {tok.kind!r} tokenizer")
    if len(vocab.tokens) != vocab_size:
        raise CheckpointError(f"the tokenizer has {len(vocab.tokens)} tokens but the model {vocab_size}; the "
                              "checkpoint is inconsistent")
    return vocab


def _char_vocab(tok: CharTokenizer, normal: int, control: int) -> Vocab:
    """A character vocabulary as one-byte BPE tokens with no merges: exact for ASCII characters only."""
    wide = [c for c in tok.chars if ord(c) > 127]
    if wide:
        named = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in wide[:3]) + (", ..." if len(wide) > 3 else "")
        raise CheckpointError(
            f"the character vocabulary holds {len(wide)} non-ASCII character(s) ({named}): llama.cpp's BPE splits "
            "them into their UTF-8 bytes, which have no tokens here, so it would tokenize differently; train with "
            "--tokenizer byte or bpe:N for a GGUF export")
    if tok.unk is not None:
        raise CheckpointError(
            f"the character vocabulary maps unknown characters to {tok.unk!r}, and llama.cpp drops them instead, "
            "so it would tokenize differently; train without an unknown-character token, or with --tokenizer "
            "byte or bpe:N, for a GGUF export")
    byte_chars = _byte_chars()
    return Vocab([byte_chars[ord(c)] for c in tok.chars] + [EOS_TEXT], [normal] * len(tok.chars) + [control],
                 INERT_MERGES, GPT2_PRE, tok.eos_id)


def _hf_vocab(tok: Tokenizer, normal: int, control: int, user_defined: int) -> Vocab:
    """A `tokenizers` byte-level BPE (trained or imported tokenizer.json) with its merges and split."""
    from tokenizers import Tokenizer as HFT

    doc = json.loads(tok.json)
    model = doc.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(doc.get("pre_tokenizer")):
        raise CheckpointError(
            f"the {tok.kind} tokenizer is a {model.get('type', 'non-BPE')} model without GPT-2's byte-level "
            "pre-tokenizer, and only byte-level BPE vocabularies are exported to GGUF so far; use export-hf and "
            "llama.cpp's converter, or train with --tokenizer bpe:N")
    # A vocabulary of bytes with no merges (a byte tokenizer given chat markers) gives the same ids however
    # the text is split, so llama.cpp's GPT-2 split serves.
    pre = GPT2_PRE if not model.get("merges") else _pre_name(doc.get("pre_tokenizer"))
    if pre is None:
        raise CheckpointError(
            f"the {tok.kind} tokenizer splits text with a pre-tokenizer llama.cpp has no name for here (known: "
            f"{', '.join(sorted(set(PRE_TOKENIZERS.values())))}), so llama.cpp could tokenize differently; "
            "use export-hf, or train with --tokenizer bpe:N")
    hf = HFT.from_str(tok.json)
    tokens = [hf.id_to_token(i) for i in range(tok.vocab_size)]
    if None in tokens:
        raise CheckpointError(f"the {tok.kind} tokenizer has no token for id {tokens.index(None)}; GGUF vocabularies "
                              "number their tokens without gaps")
    added = {t["id"]: t for t in doc.get("added_tokens") or []}
    types = [(control if added[i].get("special") else user_defined) if i in added else normal
             for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return Vocab(tokens, types, merges or INERT_MERGES, pre, tok.eos_id)


def _is_byte_level(pre: Any) -> bool:
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    return any(isinstance(s, dict) and s.get("type") == "ByteLevel" for s in steps)


def _pre_name(pre: Any) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer (a ByteLevel split with GPT-2's regex, or a
    Split by a known regex then ByteLevel without one), None when it is none of the known splits."""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return None if steps[0].get("add_prefix_space") else GPT2_PRE
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert") and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
        return PRE_TOKENIZERS.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def gguf_tensors(model: GPT, arch: Architecture) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 CPU tensor) of every weight the architecture reads, in the model's order.

    A model without biases gets zero biases (GGUF's gpt2 requires them; a zero bias computes what no
    bias does). The tied output head is written once, as token_embd: llama.cpp reuses it without
    `output.weight`."""
    gguf = require_gguf()
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], config.n_layer)
    state = model.state_dict()
    with torch.device("meta"):
        full = GPT(dataclasses.replace(config, bias=True)).state_dict()
    tied = model.lm_head.weight is model.transformer.wte.weight
    for name, meta in full.items():
        if name == "lm_head.weight" and tied:
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise CheckpointError(f"GGUF's {arch.name} has no tensor for the weight {name!r}")
        tensor = state.get(name)
        if tensor is None:
            tensor = torch.zeros(meta.shape)
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
