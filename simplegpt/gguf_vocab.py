"""A simplegpt tokenizer as GGUF's byte-level BPE vocabulary (`tokenizer.ggml.model` "gpt2"), for
export-gguf, and the names and conventions import-gguf reads back.

The tokens are written in the byte-to-character alphabet GPT-2's BPE uses, with their token types
(control for end-of-text and chat markers), the merges in rank order and the name of the split
llama.cpp applies before merging (`tokenizer.ggml.pre`). A vocabulary llama.cpp would not split
exactly as simplegpt does is refused in one line saying why and what to use instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError
from .tokenizer import EOS_TEXT, ByteTokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer, gpt2_vocab_files


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
    from .gguf_export import require_gguf  # here: gguf_export imports this module

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
    if len(vocab.tokens) < vocab_size:
        # an embedding padded past its tokenizer (Qwen3's 151936 rows for 151669 tokens): the rows with
        # no token are written as unused tokens, as llama.cpp's converter pads them
        pad = vocab_size - len(vocab.tokens)
        vocab.tokens += [f"[PAD{i}]" for i in range(len(vocab.tokens), vocab_size)]
        vocab.types += [int(gguf.TokenType.UNUSED)] * pad
    if len(vocab.tokens) != vocab_size:
        raise CheckpointError(f"the tokenizer has {len(vocab.tokens)} tokens but the model {vocab_size}; the "
                              "checkpoint is inconsistent")
    return vocab


def char_merges(chars: list[str]) -> list[str]:
    """The merges that make each multi-byte character of `chars` one BPE symbol in llama.cpp: per
    character, one chain joining its UTF-8 bytes (in the byte-level alphabet) left to right, e.g.
    "—" (E2 80 94) gets "â Ģ" then "âĢ Ķ". llama.cpp applies a merge whenever both sides are adjacent
    symbols, without looking the merged text up in the vocabulary, so the intermediates ("âĢ") need
    no tokens. No merge crosses two characters: every merge's right side is a continuation byte, and a
    character starts with a lead byte (or is ASCII). INERT_MERGES when every character is one byte."""
    byte_chars = _byte_chars()
    merges: dict[str, None] = {}
    for c in chars:
        encoded = [byte_chars[b] for b in c.encode("utf-8")]
        for i in range(1, len(encoded)):
            merges["".join(encoded[:i]) + " " + encoded[i]] = None
    return list(merges) or INERT_MERGES


def _char_vocab(tok: CharTokenizer, normal: int, control: int) -> Vocab:
    """A character vocabulary as byte-level BPE tokens, one per character, with the char_merges that
    rebuild each multi-byte character from its bytes: llama.cpp then gives each character its id."""
    if tok.unk is not None:
        raise CheckpointError(
            f"the character vocabulary maps unknown characters to {tok.unk!r}, and llama.cpp drops them instead, "
            "so it would tokenize differently; train without an unknown-character token, or "
            "with --tokenizer byte or bpe:N, for a GGUF export")
    byte_chars = _byte_chars()
    tokens = ["".join(byte_chars[b] for b in c.encode("utf-8")) for c in tok.chars]
    return Vocab(tokens + [EOS_TEXT], [normal] * len(tok.chars) + [control], char_merges(tok.chars), GPT2_PRE,
                 tok.eos_id)


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
