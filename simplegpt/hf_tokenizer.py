"""A tokenizer backed by Hugging Face `tokenizers`: a byte-level BPE trained on a corpus, or an
imported model's `tokenizer.json`.

Saved as two files in the tokenizer's folder: simplegpt's spec `tokenizer.json` (as every simplegpt
tokenizer: type, vocab_size, eos_id, plus the name and SHA-256 of the next file) and HF_FILE, the
Hugging Face tokenizer itself. Folders written before this class existed hold only the spec and load
as before; a folder whose `tokenizer.json` is itself a Hugging Face file (an imported model's) is
recognised by its keys. Both files are JSON data: reading them runs no code.

`train_bpe(texts, 8192)` trains a byte-level BPE: GPT-2's pre-tokenizer split (its regex, on
bytes mapped to printable characters), 256 byte tokens + 7936 merges, and SPECIAL_TOKENS on top,
so vocab_size is 8192 + 3. Any string encodes, and every id sequence decodes to its exact bytes.

A tokenizer may carry a chat template (`chat_template`, a Jinja string in Hugging Face's convention,
see simplegpt.chat): kept in the spec, read from an imported folder's tokenizer_config.json.
`as_hf_tokenizer` rebuilds GPT-2's and the byte tokenizer as HFTokenizers with the same ids, so that
chat markers can be added to them (`with_special_tokens`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable

from .tokenizer import EOS_TEXT, SPEC_FILE, Tokenizer

HF_FILE = "hf_tokenizer.json"
# End of text, then the ChatML turn markers (Qwen's and SmolLM2's): <|im_start|>role\n...<|im_end|>
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
SPECIAL_TOKENS = (EOS_TEXT, *CHAT_TOKENS)
MIN_BPE_VOCAB = 256
# End-of-sequence tokens of common tokenizer.json files, tried in order when no eos is named.
_EOS_CANDIDATES = (EOS_TEXT, "<|im_end|>", "</s>", "<|end_of_text|>", "<|eot_id|>", "<eos>")


def parse_bpe_name(name: str) -> int | None:
    """The vocabulary size N of a tokenizer name 'bpe:N' (N >= 256 tokens learned from bytes; the
    special tokens come on top); None for another name. ValueError for a malformed 'bpe...' name."""
    if not name.startswith("bpe"):
        return None
    m = re.fullmatch(r"bpe:(\d+)", name)
    if not m:
        raise ValueError(f"tokenizer {name!r}: write bpe:N with N a vocabulary size, e.g. bpe:8192")
    n = int(m[1])
    if n < MIN_BPE_VOCAB:
        raise ValueError(f"tokenizer {name!r}: a byte-level BPE needs at least {MIN_BPE_VOCAB} tokens "
                         f"(one per byte), got {n}")
    return n


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The byte-level alphabet's character -> byte (the inverse of GPT-2's bytes_to_unicode)."""
    from tokenizers.pre_tokenizers import ByteLevel

    # ByteLevel.alphabet() is the 256 characters; which byte each stands for is fixed by GPT-2's scheme:
    # printable Latin-1 bytes stand for themselves, the others map to U+0100 upwards in byte order.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    assert set(chars) == set(ByteLevel.alphabet())
    return chars


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` behind simplegpt's interface.

    encode(text) treats special-token text typed in `text` (e.g. "<|endoftext|>") as plain text, as
    every simplegpt tokenizer does, and adds no BOS/EOS; encode(text, specials=True) turns it into
    the special tokens. decode_bytes gives each token's exact bytes (it may end inside a character).
    kind is "bpe" for a tokenizer trained by simplegpt, "hf" for an imported one.
    """

    def __init__(self, hf_json: str, eos_id: int, kind: str = "hf", chat_template: str | None = None) -> None:
        from tokenizers import Tokenizer as HFT

        self.kind = kind
        self.chat_template = chat_template
        self.json = hf_json
        self._plain = HFT.from_str(hf_json)
        self._plain.encode_special_tokens = True  # special-token text in user input stays text
        self._special = HFT.from_str(hf_json)
        self.vocab_size = self._plain.get_vocab_size(with_added_tokens=True)
        if not 0 <= eos_id < self.vocab_size:
            raise ValueError(f"eos id {eos_id} out of range for a vocabulary of {self.vocab_size}")
        self.eos_id = eos_id
        doc = json.loads(hf_json)
        # A SentencePiece-style file puts a '▁' before the text and its decoder strips the space again.
        strips = [d for d in _walk(doc.get("decoder")) if d.get("type") == "Strip" and d.get("content") == " "]
        self._strip_start = max((int(d.get("start", 0)) for d in strips), default=0)
        self._bytes = self._token_bytes(doc)
        # the special tokens' text -> id: what encode(specials=True) turns into one token
        self.special_tokens = {t["content"]: t["id"] for t in doc.get("added_tokens") or [] if t.get("special")}
        self.sha256 = hashlib.sha256(hf_json.encode("utf-8")).hexdigest()

    def _token_bytes(self, doc: dict) -> list[bytes]:
        """Every id's bytes (doc: the parsed tokenizer.json): byte-level tokens through the byte
        alphabet, added tokens as their text, SentencePiece-style tokens with '▁' as a space and
        '<0xNN>' as byte NN."""
        byte_level = any(d.get("type") == "ByteLevel" for d in _walk([doc.get("pre_tokenizer"), doc.get("decoder")]))
        byte_fallback = bool((doc.get("model") or {}).get("byte_fallback"))
        added = {t["id"]: t["content"] for t in doc.get("added_tokens") or []}
        table = _byte_decoder()
        out = [b""] * self.vocab_size
        for i in range(self.vocab_size):
            token = self._plain.id_to_token(i)
            if token is None:
                continue
            if byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                out[i] = bytes([int(token[3:5], 16)])
            elif i in added:
                out[i] = added[i].encode("utf-8")
            elif byte_level and all(c in table for c in token):
                out[i] = bytes(table[c] for c in token)
            else:
                out[i] = token.replace("\u2581", " ").encode("utf-8")
        return out

    @classmethod
    def from_file(cls, path: str | os.PathLike, eos_token: str | None = None) -> "HFTokenizer":
        """An imported Hugging Face tokenizer.json. eos_token defaults to tokenizer_config.json's
        beside it, else the first of the usual end tokens the vocabulary holds. The chat template is
        tokenizer_config.json's chat_template, else chat_template.jinja beside it, if any. ValueError when the
        file is not a tokenizer.json or no end-of-sequence token is found; OSError when unreadable."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
        if not is_hf_tokenizer_json(doc):
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json (no 'model' table)")
        config = path.with_name("tokenizer_config.json")
        try:
            settings = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{config} is not valid JSON ({e})") from None
        settings = settings if isinstance(settings, dict) else {}
        if eos_token is None:
            eos = settings.get("eos_token")
            eos_token = eos.get("content") if isinstance(eos, dict) else eos
        try:
            from tokenizers import Tokenizer as HFT
            probe = HFT.from_str(text)
        except Exception as e:  # the Rust parser's errors have no common Python type
            raise ValueError(f"{path}: tokenizers cannot read it ({e})") from None
        names = [eos_token] if eos_token else list(_EOS_CANDIDATES)
        ids = [probe.token_to_id(n) for n in names if n]
        eos_id = next((i for i in ids if i is not None), None)
        if eos_id is None:
            raise ValueError(f"{path}: no end-of-sequence token ({', '.join(n for n in names if n)}) in its vocabulary")
        template = _template_setting(settings.get("chat_template"))
        jinja = path.with_name("chat_template.jinja")  # where newer transformers save it
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        return cls(text, eos_id, kind="hf", chat_template=template)

    def token_id(self, text: str) -> int | None:
        """The id of the one token whose text is `text` (a special token's included), or None."""
        return self._plain.token_to_id(text)

    def with_special_tokens(self, tokens: Iterable[str]) -> "HFTokenizer":
        """A copy that also holds `tokens` as special tokens (new ids from vocab_size up, in order;
        ones it holds already keep theirs), its chat template kept."""
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFT

        tok = HFT.from_str(self.json)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens
                                if self.token_id(t) is None])
        return HFTokenizer(tok.to_str(), self.eos_id, kind=self.kind, chat_template=self.chat_template)

    def encode(self, text: str, specials: bool = False) -> list[int]:
        enc = self._special if specials else self._plain
        return enc.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], specials: bool = False) -> list[list[int]]:
        enc = self._special if specials else self._plain
        return [e.ids for e in enc.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ids; for a file whose decoder strips the leading space its encoding added
        (SentencePiece style), without it, as `tokenizers` decodes. decode_bytes keeps it (streaming)."""
        text = super().decode(ids)
        n = self._strip_start
        return text[len(text[:n]) - len(text[:n].lstrip(" ")):] if n else text

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._bytes
        return b"".join(table[i] for i in self._check_ids(ids))

    def spec(self) -> dict:
        spec = {**super().spec(), "file": HF_FILE, "sha256": self.sha256}
        return {**spec, "chat_template": self.chat_template} if self.chat_template is not None else spec

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / HF_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.json, encoding="utf-8")
        os.replace(tmp, path)
        return super().save(directory)  # the spec last: a folder with a spec has its HF file

    @classmethod
    def load(cls, directory: str | os.PathLike, spec: dict) -> "HFTokenizer":
        """The tokenizer of a folder whose spec (its tokenizer.json) says type 'bpe' or 'hf'.
        ValueError when HF_FILE does not match the spec's checksum; OSError when missing."""
        path = Path(directory) / spec.get("file", HF_FILE)
        text = path.read_text(encoding="utf-8")
        if hashlib.sha256(text.encode("utf-8")).hexdigest() != spec.get("sha256"):
            raise ValueError(f"{path} does not match the checksum in {SPEC_FILE}: the tokenizer is damaged")
        template = spec.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise ValueError(f'"chat_template" in {SPEC_FILE} is a {type(template).__name__}, not a Jinja template '
                             "string")
        tok = cls(text, int(spec["eos_id"]), kind=spec["type"], chat_template=template)
        if tok.vocab_size != spec.get("vocab_size"):
            raise ValueError(f"{path} has {tok.vocab_size} tokens, its {SPEC_FILE} says {spec.get('vocab_size')}")
        return tok

    def __reduce__(self):  # worker processes get the JSON text (the Rust object does not pickle)
        return HFTokenizer, (self.json, self.eos_id, self.kind, self.chat_template)


def _template_setting(value: object) -> str | None:
    """tokenizer_config.json's chat_template: a string, or Hugging Face's list of named templates
    (the one named "default" is the chat template)."""
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


def _walk(node: object) -> Iterable[dict]:
    """node and the tables inside it (a Sequence decoder's steps)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def is_hf_tokenizer_json(doc: object) -> bool:
    """Whether a parsed tokenizer.json is a Hugging Face one (simplegpt's spec has a 'type' and no 'model')."""
    return isinstance(doc, dict) and isinstance(doc.get("model"), dict) and "type" not in doc


def train_bpe(texts: Iterable[str], vocab_size: int, progress: bool = False) -> HFTokenizer:
    """A byte-level BPE of vocab_size (>= 256) tokens trained on `texts`, SPECIAL_TOKENS added on
    top (ids 0, 1, 2; EOS is <|endoftext|> = 0). A small corpus can give fewer merges than asked.
    The same texts and size give the same tokenizer. ValueError for a size below 256."""
    from tokenizers import Tokenizer as HFT
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"a byte-level BPE needs at least {MIN_BPE_VOCAB} tokens (one per byte), got {vocab_size}")
    tok = HFT(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + len(SPECIAL_TOKENS), special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok.to_str(), eos_id=tok.token_to_id(EOS_TEXT), kind="bpe")


def as_hf_tokenizer(tokenizer: Tokenizer) -> HFTokenizer:
    """The tokenizer as an HFTokenizer giving the same ids for every text: itself when it is one;
    GPT-2's BPE (from the vocabulary files tiktoken's encoding is built from) and the byte tokenizer
    (its 256 bytes as byte-level tokens, end-of-text at 256) rebuilt with `tokenizers`.
    ValueError for a character tokenizer, which has no byte-level equivalent."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFT
    from tokenizers import decoders, models, pre_tokenizers

    if isinstance(tokenizer, HFTokenizer):
        return tokenizer
    if tokenizer.kind == "gpt2":
        from .tokenizer import gpt2_vocab_files

        encoder, bpe = gpt2_vocab_files()
        merges = [tuple(line.split(" ")) for line in bpe.read_text(encoding="utf-8").splitlines()[1:] if line]
        model = models.BPE(json.loads(encoder.read_text(encoding="utf-8")), merges)
    elif tokenizer.kind == "byte":
        table = _byte_decoder()
        model = models.BPE({c: b for c, b in table.items()}, [])
    else:
        raise ValueError(f"a {tokenizer.kind} tokenizer cannot be rebuilt as a byte-level one; prepare the data "
                         "with --tokenizer byte, gpt2 or bpe:N")
    tok = HFT(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=tokenizer.kind == "gpt2")
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TEXT, special=True, normalized=False)])
    if tok.token_to_id(EOS_TEXT) != tokenizer.eos_id:
        raise AssertionError(f"rebuilt {tokenizer.kind} tokenizer puts {EOS_TEXT} at {tok.token_to_id(EOS_TEXT)}")
    return HFTokenizer(tok.to_str(), tokenizer.eos_id, kind="hf")
