"""Corpora to token shards, and batches from them.

`prepare_corpus(source, out_dir, tokenizer)` turns a source into a dataset directory:

    meta.json             tokenizer spec, vocab size, dtype, token and byte counts, split, source checksums
    tokenizer/            the tokenizer (tokenizer.json)
    train_000000.bin ...  token shards: flat little-endian uint16 (vocab < 65536) or uint32
    val_000000.bin        the validation split (the last val_fraction of the token stream)

Documents are separated by the tokenizer's EOS token. The directory is written into a temporary
sibling and swapped in, so an interrupted prepare never leaves a half-written dataset, and
re-running on unchanged input finds matching checksums in meta.json and does nothing.

Batches: `PackedSampler` draws seeded random windows of block_size + 1 tokens from the shards
(its state is saved in checkpoints for exact resume); `PaddedSampler` is the tutorial's mode,
one short text per row, padded, with an attention mask and IGNORE_INDEX labels on padding.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from .atomic import atomic_dir
from .errors import DataError
from .hub import OFFLINE_HINT, hub_reachable, offline_mode, quiet_hub_logs
from .model import IGNORE_INDEX
from .tokenizer import ByteTokenizer, CharTokenizer, Tokenizer, get_tokenizer, load_tokenizer

META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".md", ".text")
URL_ALIASES = {
    "tinyshakespeare": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
}
DEFAULT_SHARD_TOKENS = 100_000_000
ENCODE_BATCH_DOCS = 256


def cache_dir() -> Path:
    """Where downloads are kept: $SIMPLEGPT_CACHE, else $XDG_CACHE_HOME/simplegpt, else ~/.cache/simplegpt."""
    env = os.environ.get("SIMPLEGPT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "simplegpt"


@dataclass
class Corpus:
    """A re-iterable stream of documents with a fingerprint that changes when the text does."""

    name: str
    documents: Callable[[], Iterable[str]]
    fingerprint: dict[str, str]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_text(path: Path) -> str:
    # utf-8-sig drops a leading byte-order mark (Windows editors write one), which would otherwise
    # become the corpus's first character and a token of its own.
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8 first") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8-sig") as f:  # a leading byte-order mark would break line 1's JSON
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n} is not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict) or text_field not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{path}:{n} has no {text_field!r} field (has {keys}); pass --text-field NAME")
            if not isinstance(row[text_field], str):
                raise DataError(f"{path}:{n} field {text_field!r} is not a string")
            yield row[text_field]


def _file_documents(files: list[Path], text_field: str) -> Iterator[str]:
    # Each .txt file is one document; each .jsonl line is one document.
    for path in files:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        else:
            yield _read_text(path)


def _local_files(source: str) -> list[Path]:
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"the pattern {source!r} matches no files")
        return files
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl")
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"the folder {path} holds no .txt, .md or .jsonl files")
        return files
    if path.is_file():
        return [path]
    raise DataError(f"corpus {source!r} not found: give a file, folder, glob, URL, 'shakespeare', "
                    f"'tinyshakespeare' or 'hf:NAME'")


def download(url: str, timeout: float = 60.0) -> Path:
    """Fetch url once into the cache (temp file + rename) and return the cached path."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    dest = cache_dir() / "downloads" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".part-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
        os.replace(tmp, dest)
    except OSError as e:  # URLError and HTTPError are OSErrors
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {url} ({getattr(e, 'reason', e)}); "
                        "check the network or pass a local file instead") from None
    return dest


def _hf_corpus(spec: str, text_field: str, split: str) -> Corpus:
    # spec: "NAME" or "NAME:CONFIG" (e.g. hf:wikitext:wikitext-2-raw-v1)
    name, _, config = spec.partition(":")
    try:
        import datasets  # optional extra, imported only for hf: sources
    except ImportError:
        raise DataError('Hugging Face datasets need the "datasets" extra: pip install "simplegpt-toolkit[datasets]"') from None

    def documents() -> Iterator[str]:
        if not Path(name).expanduser().exists() and not offline_mode() and not hub_reachable():
            raise DataError(f"cannot open the Hugging Face dataset {spec!r}: the hub cannot be reached; {OFFLINE_HINT}")
        try:
            with quiet_hub_logs():
                ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
        except Exception as e:  # offline, unknown name, bad config: datasets raises many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(f"could not open the Hugging Face dataset {spec!r} ({type(e).__name__}: {first}); "
                            "check the name and the network") from None
        for row in ds:
            if text_field not in row:
                raise DataError(f"dataset {spec!r} has no {text_field!r} column (has {sorted(row)}); "
                                "pass --text-field NAME")
            yield row[text_field]

    return Corpus(name=f"hf:{spec}", documents=documents,
                  fingerprint={"hf": spec, "split": split, "text_field": text_field})


def resolve_corpus(source: str, text_field: str = "text", hf_split: str = "train") -> Corpus:
    """A Corpus from a source string: 'shakespeare', 'tinyshakespeare', a URL, 'hf:NAME[:CONFIG]',
    or local .txt/.md/.jsonl files, folders and globs."""
    if not source or not source.strip():
        raise DataError("no corpus given: pass a file, folder, glob, URL, 'shakespeare' or 'hf:NAME'")
    if source == "shakespeare":
        from .corpus_shakespeare import shakespeare_documents, shakespeare_fingerprint

        return Corpus("shakespeare", shakespeare_documents, {"shakespeare-plays": shakespeare_fingerprint()})
    if source.startswith("hf:"):
        return _hf_corpus(source[3:], text_field, hf_split)
    url = URL_ALIASES.get(source, source)
    if urllib.parse.urlparse(url).scheme in ("http", "https"):
        path = download(url)
        return Corpus(source, lambda: _file_documents([path], text_field), {url: _sha256_file(path)})
    files = _local_files(source)
    fingerprint = {str(p): _sha256_file(p) for p in files}
    return Corpus(source, lambda: _file_documents(files, text_field), fingerprint)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


def _encode_batch(tokenizer: Tokenizer, docs: list[str]) -> list[np.ndarray]:
    if isinstance(tokenizer, CharTokenizer):
        # Vectorised lookup: code points -> ids through a sorted table (5 MB of text in ~0.1 s).
        table = np.array([ord(c) for c in tokenizer.chars], dtype=np.uint32)
        out = []
        for doc in docs:
            cps = np.frombuffer(doc.encode("utf-32-le"), dtype=np.uint32)
            ids = np.searchsorted(table, cps)
            bad = (ids >= len(table)) | (table[np.minimum(ids, len(table) - 1)] != cps)
            if bad.any():
                ids = np.asarray(tokenizer.encode(doc))  # raises (or maps to unk) with a clear message
            out.append(ids)
        return out
    if isinstance(tokenizer, ByteTokenizer):
        return [np.frombuffer(doc.encode("utf-8"), dtype=np.uint8) for doc in docs]
    # GPT-2 BPE: tiktoken encodes the batch on all cores.
    return [np.asarray(ids) for ids in tokenizer.encode_batch(docs)]


def _batched(docs: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _char_vocabulary(corpus: Corpus) -> CharTokenizer:
    chars: set[str] = set()
    for doc in corpus.documents():
        chars.update(doc)
    if not chars:
        raise DataError(f"corpus {corpus.name!r} is empty: it holds no text")
    return CharTokenizer(chars)


def _write_shards(stream: np.ndarray, out: Path, prefix: str, shard_tokens: int) -> list[dict]:
    shards = []
    for i, start in enumerate(range(0, max(len(stream), 1), shard_tokens)):
        part = stream[start:start + shard_tokens]
        name = f"{prefix}_{i:06d}.bin"
        part.tofile(out / name)
        shards.append({"file": name, "tokens": int(len(part))})
    return shards


def _decoded_bytes(tokenizer: Tokenizer, ids: np.ndarray, chunk: int = 1 << 20) -> int:
    """UTF-8 bytes the tokens stand for (EOS counts zero), for bits-per-byte."""
    total = 0
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        total += len(tokenizer.decode_bytes(part[part != tokenizer.eos_id].tolist()))
    return total


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a prepared dataset directory; DataError when missing or damaged."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{data_dir} is not a prepared dataset ({META_FILE} missing); run 'simplegpt prepare' first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is corrupted ({e}); prepare the dataset again") from None
    if not isinstance(meta, dict) or meta.get("format") != "simplegpt-dataset":
        raise DataError(f"{path} is not a simplegpt dataset description; prepare the dataset again")
    return meta


def prepare_corpus(
    source: str | Corpus,
    out_dir: str | os.PathLike,
    tokenizer: str | Tokenizer = "char",
    val_fraction: float = 0.1,
    text_field: str = "text",
    hf_split: str = "train",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize a corpus into a dataset directory and return its meta.json contents.

    Does nothing (and returns the existing meta) when out_dir already holds this corpus,
    tokenized the same way, unless force=True.
    """
    from tqdm.auto import tqdm

    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    corpus = source if isinstance(source, Corpus) else resolve_corpus(source, text_field, hf_split)
    out = Path(out_dir)
    request = {"source": corpus.name, "source_checksums": corpus.fingerprint, "val_fraction": val_fraction,
               "tokenizer_request": tokenizer if isinstance(tokenizer, str) else tokenizer.kind}
    if not force and (out / META_FILE).is_file():
        try:
            meta = read_meta(out)
        except DataError:
            meta = {}
        same_tokenizer = isinstance(tokenizer, str) or meta.get("tokenizer") == tokenizer.spec()
        if same_tokenizer and all(meta.get(k) == v for k, v in request.items()):
            return meta
    if isinstance(tokenizer, str):
        tok = _char_vocabulary(corpus) if tokenizer == "char" else get_tokenizer(tokenizer)
    else:
        tok = tokenizer
    dtype = token_dtype(tok.vocab_size)

    _check_out_dir(out)
    with atomic_dir(out) as tmp:
        # Pass 1: every document's tokens + EOS, appended to one flat stream on disk.
        n_docs = n_bytes = 0
        stream_path = tmp / "all.tmp"
        with open(stream_path, "wb") as f, tqdm(desc=f"tokenizing {corpus.name}", unit="B", unit_scale=True,
                                                disable=not progress) as bar:
            eos = np.array([tok.eos_id], dtype=dtype)
            for docs in _batched(corpus.documents(), ENCODE_BATCH_DOCS):
                for doc, ids in zip(docs, _encode_batch(tok, docs)):
                    if len(ids) == 0:
                        continue
                    ids.astype(dtype).tofile(f)
                    eos.tofile(f)
                    n_docs += 1
                    size = len(doc.encode("utf-8"))
                    n_bytes += size
                    bar.update(size)
        stream = np.memmap(stream_path, dtype=dtype, mode="r") if n_docs else np.zeros(0, dtype)
        if n_docs == 0 or len(stream) < 2:
            raise DataError(f"corpus {corpus.name!r} is empty: it holds no text to train on")
        # Pass 2: the last val_fraction of the stream is the validation split (at least 2 tokens).
        n_val = max(2, int(len(stream) * val_fraction))
        cut = len(stream) - n_val
        train_shards = _write_shards(stream[:cut], tmp, "train", shard_tokens)
        val_shards = _write_shards(stream[cut:], tmp, "val", shard_tokens)
        val_bytes = _decoded_bytes(tok, np.asarray(stream[cut:]))
        del stream
        stream_path.unlink()
        tok.save(tmp / TOKENIZER_DIR)
        meta = {
            "format": "simplegpt-dataset",
            "version": FORMAT_VERSION,
            **request,
            "tokenizer": tok.spec(),
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "dtype": dtype.name,
            "documents": n_docs,
            "bytes": n_bytes,
            "tokens": {"train": cut, "val": n_val},
            "bytes_per_token": n_bytes / (cut + n_val),
            "val_bytes": val_bytes,
            "val_bytes_per_token": val_bytes / n_val,
            "split": {"method": "tail", "val_fraction": val_fraction},
            "shards": {"train": train_shards, "val": val_shards},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    return meta


def _check_out_dir(path: Path) -> None:
    """Refuse, before any work, to replace a file or a folder that is not a simplegpt dataset."""
    if not path.exists():
        return
    if not path.is_dir():
        raise DataError(f"{path} exists and is not a directory; choose another output path")
    if any(path.iterdir()) and not (path / META_FILE).is_file():
        raise DataError(f"{path} holds files that are not a simplegpt dataset; choose an empty or new folder")


class TokenShards:
    """One split of a prepared dataset: its shards memory-mapped, read-only."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        meta = read_meta(data_dir)
        if split not in meta["shards"]:
            raise DataError(f"{data_dir} has no {split!r} split")
        dtype = np.dtype(meta["dtype"])
        self.arrays: list[np.ndarray] = []
        for shard in meta["shards"][split]:
            path = Path(data_dir) / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise DataError(f"{path} is missing or truncated; prepare the dataset again")
            arr = np.memmap(path, dtype=dtype, mode="r") if shard["tokens"] else np.zeros(0, dtype)
            self.arrays.append(arr)
        self.num_tokens = sum(len(a) for a in self.arrays)


class PackedSampler:
    """Seeded random windows of block_size + 1 tokens: x = window[:-1], y = window[1:].

    A window never crosses a shard boundary; every start position of every shard is equally
    likely. The generator state is part of the checkpoint, so a resumed run draws the same
    batches as an uninterrupted one.
    """

    def __init__(self, shards: TokenShards, block_size: int, batch_size: int, seed: int):
        self.arrays = [a for a in shards.arrays if len(a) > block_size]
        if not self.arrays:
            raise DataError(
                f"the split has {shards.num_tokens} tokens, fewer than block_size + 1 = {block_size + 1}; "
                "use a smaller block_size or a bigger corpus"
            )
        self.block_size = block_size
        self.batch_size = batch_size
        # starts[i] = number of valid window starts in shards 0..i-1
        self.starts = np.cumsum([0] + [len(a) - block_size for a in self.arrays])
        self.rng = np.random.default_rng(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (batch_size, block_size) int64."""
        picks = self.rng.integers(0, self.starts[-1], size=self.batch_size)
        shard = np.searchsorted(self.starts, picks, side="right") - 1
        rows = [self.arrays[s][p - self.starts[s]: p - self.starts[s] + self.block_size + 1]
                for s, p in zip(shard, picks)]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


class PaddedSampler:
    """The tutorial's per-text batches: one document per row, cut to block_size + 1 tokens,
    padded with pad_id; batches are (x, y, attention_mask) with IGNORE_INDEX on padded targets."""

    def __init__(self, documents: list[np.ndarray], block_size: int, batch_size: int, pad_id: int, seed: int):
        self.docs = [np.asarray(d[: block_size + 1], dtype=np.int64) for d in documents if len(d) >= 2]
        if not self.docs:
            raise DataError("no text has at least 2 tokens: padded batches need texts to predict")
        self.block_size = block_size
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer: Tokenizer, block_size: int, batch_size: int,
                   seed: int = 0) -> "PaddedSampler":
        return cls([np.asarray(tokenizer.encode(t)) for t in texts], block_size, batch_size,
                   tokenizer.eos_id, seed)

    @classmethod
    def from_shards(cls, shards: TokenShards, eos_id: int, block_size: int, batch_size: int,
                    seed: int) -> "PaddedSampler":
        docs = []
        for arr in shards.arrays:
            ends = np.flatnonzero(np.asarray(arr) == eos_id)
            docs += np.split(np.asarray(arr), ends + 1)
        return cls(docs, block_size, batch_size, eos_id, seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, y, attention_mask: each (batch_size, T) with T the longest row in the batch."""
        picks = self.rng.integers(0, len(self.docs), size=self.batch_size)
        rows = [self.docs[i] for i in picks]
        T = max(len(r) for r in rows) - 1
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            r = torch.from_numpy(r)
            x[i, : len(r) - 1] = r[:-1]
            y[i, : len(r) - 1] = r[1:]
            mask[i, : len(r) - 1] = 1
        return x, y, mask

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


def load_dataset_tokenizer(data_dir: str | os.PathLike) -> Tokenizer:
    return load_tokenizer(Path(data_dir) / TOKENIZER_DIR)
