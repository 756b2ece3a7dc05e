"""Corpora to token shards, and batches from them.

`prepare_corpus(source, out_dir, tokenizer)` turns a source into a dataset directory:

    meta.json             tokenizer spec, vocab size, dtype, token and byte counts, split, source checksums
    tokenizer/            the tokenizer (tokenizer.json)
    train_000000.bin ...  token shards: flat little-endian uint16 (vocab < 65536) or uint32
    val_000000.bin ...    the validation split: the last val_fraction (or val_tokens) of the token stream

Documents are separated by the tokenizer's EOS token (a .txt file is one document, read in pieces:
`corpus_files`). The corpus is a stream: batches of documents
are tokenized in worker processes (`_EncodingPool`, results in corpus order, a few batches per worker
in flight) and appended to train shards as they fill (`_ShardWriter`), so memory is bounded whatever
the corpus's size and the output does not depend on the number of workers; max_tokens stops reading
at a token budget. The validation split is the stream's tail, moved out of the last train shards
once the stream's length is known (`_split_tail`). The directory is written into a temporary
sibling and swapped in, so an interrupted prepare never leaves a half-written dataset, and
re-running on unchanged input finds matching checksums in meta.json and does nothing.

Batches: `PackedSampler` draws seeded random windows of block_size + 1 tokens from the shards
(its state is saved in checkpoints for exact resume); `PaddedSampler` is the tutorial's mode,
one short text per row, padded, with an attention mask and IGNORE_INDEX labels on padding.
"""

from __future__ import annotations

import contextlib
import decimal
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from .atomic import atomic_dir, no_folders_left_on_failure
from .corpus_files import Part, glob_files, text_pieces
from .errors import DISK_FULL, DataError, FileAccessError, SimpleGPTError
from .files import cache_dir, sha256_file
from .hub import OFFLINE_HINT, hub_reachable, offline_mode, quiet_hub_logs
from .model import IGNORE_INDEX
from .tokenizer import (ByteTokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer, check_tokenizer_name, get_tokenizer,
                        load_tokenizer)

META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".md", ".text")
URL_ALIASES = {
    "tinyshakespeare": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
}
DEFAULT_SHARD_TOKENS = 100_000_000
ENCODE_BATCH_DOCS = 256  # a batch for one worker: up to 256 documents or about 1 MiB of text
ENCODE_BATCH_CHARS = 1 << 20


@dataclass
class Corpus:
    """A re-iterable stream of documents with a fingerprint that changes when the text does."""

    name: str
    documents: Callable[[], Iterable[str]]
    fingerprint: dict[str, str]


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
    # Each .txt file is one document, read in pieces (Parts, then the last piece); each .jsonl line is one.
    for path in files:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        else:
            yield from text_pieces(path)


def _local_files(source: str) -> list[Path]:
    if any(ch in source for ch in "*?["):
        files = glob_files(source)
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
            advice = ("offline mode is on (HF_HUB_OFFLINE): check the name, or that the dataset is in the local "
                      "Hugging Face cache" if offline_mode() else "check the name and the network")
            raise DataError(f"could not open the Hugging Face dataset {spec!r} ({type(e).__name__}: {first}); "
                            f"{advice}") from None
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
        return Corpus(source, lambda: _file_documents([path], text_field), {url: sha256_file(path)})
    files = _local_files(source)
    fingerprint = {str(p): sha256_file(p) for p in files}
    return Corpus(source, lambda: _file_documents(files, text_field), fingerprint)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, as taskset and cgroup cpusets set it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_COUNT_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12}


def parse_count(text: str | int) -> int:
    """A count written as '10M', '1.5B', '500k', '2_000_000' or '1e9' -> int (k = 10^3, M = 10^6,
    G or B = 10^9, T = 10^12, case-insensitive). Raises ValueError for anything else, negative
    numbers and fractions included."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"(\d+(?:\.\d*)?(?:e\d+)?)\s*([kmgbt]?)", str(text).strip().replace("_", "").replace(",", ""),
                     re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not a count; write e.g. 10M, 1.5B, 500k or 2000000")
    value = decimal.Decimal(m[1]) * _COUNT_SUFFIXES[m[2].lower()]
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number")
    return int(value)


def parse_size(text: str | int) -> int:
    """A size in bytes written as '100MB', '1.5GB', '500kB', '100M' or 1000000 -> int (decimal
    suffixes k, M, G, T as parse_count, then an optional B). ValueError for anything else."""
    if isinstance(text, int):
        return text
    body = str(text).strip()
    body = body[:-1] if body[-1:] in ("b", "B") else body  # 100B is 100 bytes, not parse_count's billion
    try:
        return parse_count(body)
    except ValueError:
        raise ValueError(f"{text!r} is not a size; write e.g. 100MB, 1.5GB, 500kB or 1000000") from None


def _utf8(doc: str) -> tuple[str, bytes]:
    """doc and its UTF-8 bytes; lone surrogates (JSON can carry them) become U+FFFD first, as tiktoken does."""
    try:
        return doc, doc.encode("utf-8")
    except UnicodeEncodeError:
        doc = doc.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return doc, doc.encode("utf-8")


class _Encoder:
    """Turns a batch of documents into one token array: each non-empty document's tokens, then EOS.

    The same object runs in this process (workers=1) and in each worker process, so the output does
    not depend on the number of workers. Pickled with its tokenizer (as the tokenizer's spec, or a
    Hugging Face tokenizer's JSON text) for spawned workers."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype, unknown: str = "error"):
        self.tok = tokenizer
        self.unknown = unknown  # a character-level vocabulary's unknown characters: error, drop, or a stand-in
        self.dtype = np.dtype(dtype)
        self.eos = np.array([tokenizer.eos_id], dtype=self.dtype)
        self.table = (np.array([ord(c) for c in tokenizer.chars], dtype=np.uint32)
                      if isinstance(tokenizer, CharTokenizer) else None)

    def __reduce__(self):
        return _Encoder, (self.tok, self.dtype.str, self.unknown)

    def encode(self, doc: str) -> np.ndarray:
        """One document's tokens (no EOS), any integer dtype."""
        tok = self.tok
        if self.table is not None:
            # Vectorised lookup: code points -> ids through the sorted vocabulary.
            cps = np.frombuffer(doc.encode("utf-32-le"), dtype=np.uint32)
            ids = np.searchsorted(self.table, cps)
            bad = (ids >= len(self.table)) | (self.table[np.minimum(ids, len(self.table) - 1)] != cps)
            if bad.any():
                if self.unknown == "drop":
                    return ids[~bad]
                if self.unknown != "error":
                    return np.where(bad, tok.stoi[self.unknown], ids)
                return np.asarray(tok.encode(doc))  # UnknownCharacterError naming them (or maps them to unk)
            return ids
        if isinstance(tok, ByteTokenizer):
            return np.frombuffer(doc.encode("utf-8"), dtype=np.uint8)
        if isinstance(tok, GPT2Tokenizer):
            # encode(text, no special tokens) is encode_ordinary, straight into a numpy buffer.
            return tok._enc.encode_to_numpy(doc, allowed_special=set(), disallowed_special=())
        return np.asarray(tok.encode(doc))

    def __call__(self, docs: list[str]) -> tuple[np.ndarray, int, int]:
        """(tokens, documents, bytes): the batch's token stream and how many non-empty documents
        and UTF-8 bytes of text it holds. A Part (a document's piece that goes on in the next item)
        gets no EOS and is not counted: its document's last piece is."""
        pieces: list[np.ndarray] = []
        n_docs = n_bytes = 0
        for doc in docs:
            whole = not isinstance(doc, Part)
            doc, raw = _utf8(doc)
            ids = self.encode(doc)
            if len(ids) == 0:
                continue
            pieces += (ids, self.eos) if whole else (ids,)
            n_docs += whole
            n_bytes += len(raw)
        tokens = np.concatenate(pieces).astype(self.dtype, copy=False) if pieces else np.zeros(0, self.dtype)
        return tokens, n_docs, n_bytes


def _batched(docs: Iterable[str], n: int = ENCODE_BATCH_DOCS, chars: int = ENCODE_BATCH_CHARS) -> Iterator[list[str]]:
    """Consecutive documents in lists of at most n documents or about `chars` characters."""
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if len(batch) == n or size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# The worker processes' encoder (set once per worker by the pool's initializer).
_worker_encoder: _Encoder | None = None


def _init_worker(encoder: _Encoder, parent: int) -> None:
    global _worker_encoder
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the pool
    if sys.platform.startswith("linux"):
        # A parent killed outright (SIGKILL, or SIGTERM while 'simplegpt train' prepares its data) cannot shut
        # the pool down, and a worker waits for batches forever: Linux ends it with its parent instead
        # (prctl(2) PR_SET_PDEATHSIG = 1), and one whose parent is already gone ends now.
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
    _worker_encoder = encoder


def _encode_in_worker(docs: list[str]) -> tuple[np.ndarray, int, int]:
    assert _worker_encoder is not None
    return _worker_encoder(docs)


def _count_bytes_in_worker(path: str, offset: int, count: int) -> int:
    assert _worker_encoder is not None
    return _shard_bytes(_worker_encoder.tok, path, _worker_encoder.dtype, offset, count)


class _EncodingPool:
    """Runs an _Encoder over batches of documents in `workers` processes (or in this one when
    workers == 1), yielding results in input order with at most IN_FLIGHT_PER_WORKER batches per
    worker in flight: the reader never runs ahead of the writer by more than that, so memory is
    bounded whatever the corpus's size (multiprocessing.Pool.imap would read the whole input ahead).

    Workers are forked where the platform can, all at once when the pool is made (before the
    corpus's reader or the progress bar start a thread), so they inherit the loaded tokenizer
    instead of importing simplegpt again. A worker that dies (killed, out of memory) ends the run
    with one line instead of a hang."""

    IN_FLIGHT_PER_WORKER = 4

    def __init__(self, encoder: _Encoder, workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.encoder = encoder
        self.workers = workers
        self.pool = None
        if workers > 1:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                            initargs=(encoder, os.getpid()))
            self._result(self.pool.submit(int))  # starts the workers now

    @staticmethod
    def _result(future):
        from concurrent.futures.process import BrokenProcessPool

        try:
            return future.result()
        except BrokenProcessPool:
            raise SimpleGPTError("a tokenizing worker process died (killed, or out of memory?); "
                                 "run again, with fewer workers if memory is short") from None

    def imap(self, batches: Iterable[list[str]]) -> Iterator[tuple[np.ndarray, int, int]]:
        if self.pool is None:
            for batch in batches:
                yield self.encoder(batch)
            return
        from collections import deque

        pending: deque = deque()
        window = self.workers * self.IN_FLIGHT_PER_WORKER
        for batch in batches:
            pending.append(self.pool.submit(_encode_in_worker, batch))
            if len(pending) >= window:
                yield self._result(pending.popleft())
        while pending:
            yield self._result(pending.popleft())

    def shard_bytes(self, shards: list[tuple[Path, int]], chunk: int = 1 << 22) -> int:
        """UTF-8 bytes the tokens of these (file, tokens) shards stand for, EOS counting zero."""
        parts = [(str(path), start, min(chunk, n - start)) for path, n in shards for start in range(0, n, chunk)]
        if self.pool is None:
            return sum(_shard_bytes(self.encoder.tok, path, self.encoder.dtype, offset, count)
                       for path, offset, count in parts)
        return sum(self._result(f) for f in [self.pool.submit(_count_bytes_in_worker, *p) for p in parts])

    def close(self) -> None:
        if self.pool is not None:
            # Batches still queued (a budget reached, an error) are dropped; running ones take < 1 s.
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> "_EncodingPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shard_bytes(tok: Tokenizer, path: str, dtype: np.dtype, offset: int, count: int) -> int:
    """UTF-8 bytes of `count` tokens of a shard file from token `offset` (EOS counts zero), read
    with a plain file read so that only this chunk is ever in memory."""
    with open(path, "rb") as f:
        f.seek(offset * dtype.itemsize)
        ids = np.fromfile(f, dtype=dtype, count=count)
    return len(tok.decode_bytes(ids[ids != tok.eos_id].tolist()))


def _char_budget(documents: Iterable[str], max_tokens: int | None) -> Iterator[str]:
    """The documents that fill max_tokens character tokens (one per character, one EOS per non-empty
    document), the last one cut at the budget: all of them when max_tokens is None."""
    budget = max_tokens if max_tokens is not None else float("inf")
    for doc in documents:
        if budget <= 0:
            return
        whole = not isinstance(doc, Part)  # a Part's document goes on: its EOS comes after its last piece
        doc = _utf8(doc)[0]
        if not doc:
            continue
        yield doc if len(doc) <= budget else doc[:int(budget)]
        budget -= len(doc) + whole


def _text_sample(documents: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """The documents up to max_bytes UTF-8 bytes in all (the last one cut at a character boundary):
    all of them when max_bytes is None. What a BPE tokenizer is trained on."""
    budget = max_bytes if max_bytes is not None else float("inf")
    for doc in documents:
        if budget <= 0:
            return
        doc, raw = _utf8(doc)
        if len(raw) > budget:
            doc = raw[:int(budget)].decode("utf-8", "ignore")
        budget -= len(raw)
        if doc:
            yield doc


def _train_bpe(corpus: Corpus, vocab_size: int, sample_bytes: int | None, progress: bool) -> Tokenizer:
    """A byte-level BPE of vocab_size tokens trained on the corpus's first sample_bytes bytes (all of it
    when None), with a progress bar of the bytes read and one line of the training's time."""
    import time

    from tqdm.auto import tqdm

    from .console import say
    from .hf_tokenizer import train_bpe

    start = time.perf_counter()
    with tqdm(desc=f"training a BPE tokenizer ({vocab_size:,} tokens) on {corpus.name}", total=sample_bytes,
              unit="B", unit_scale=True, disable=not progress,
              mininterval=0.1 if sys.stderr.isatty() else 10) as bar:
        read = 0

        def texts() -> Iterator[str]:
            nonlocal read
            for doc in _text_sample(corpus.documents(), sample_bytes):
                size = len(doc.encode("utf-8"))
                read += size
                bar.update(size)
                yield doc
        tok = train_bpe(texts(), vocab_size)
    if not read:
        raise DataError(f"corpus {corpus.name!r} is empty: it holds no text")
    if progress:
        say(f"trained a BPE tokenizer of {tok.vocab_size:,} tokens on {read:,} bytes in "
            f"{time.perf_counter() - start:.1f} s")
    return tok


def _char_vocabulary(corpus: Corpus, max_tokens: int | None = None) -> CharTokenizer:
    """The characters of the corpus, or of its first max_tokens tokens (one per character, one EOS
    per non-empty document): exactly what prepare will encode (it cuts the documents the same way)."""
    chars: set[str] = set()
    for doc in _char_budget(corpus.documents(), max_tokens):
        chars.update(doc)
    if not chars:
        raise DataError(f"corpus {corpus.name!r} is empty: it holds no text")
    return CharTokenizer(chars)


class _ShardWriter:
    """Appends tokens to numbered shard files PREFIX_000000.bin, ... of shard_tokens tokens each,
    opening the next file when one is full: only the token array being written is ever in memory."""

    def __init__(self, out: Path, prefix: str, shard_tokens: int):
        self.out, self.prefix, self.shard_tokens = out, prefix, shard_tokens
        self.shards: list[dict] = []  # {"file", "tokens"} of each file begun, in order
        self.tokens = 0
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        start = 0
        while start < len(tokens):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_file()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part = tokens[start:start + room]
            # a plain write: ndarray.tofile reports a full disk as an OSError without its errno
            self._file.write(memoryview(part).cast("B"))
            self.shards[-1]["tokens"] += len(part)
            self.tokens += len(part)
            start += len(part)

    def _next_file(self) -> None:
        self.close()
        name = f"{self.prefix}_{len(self.shards):06d}.bin"
        self._file = open(self.out / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _empty_shard(out: Path, prefix: str) -> dict:
    name = f"{prefix}_000000.bin"
    (out / name).touch()
    return {"file": name, "tokens": 0}


def _split_tail(out: Path, shards: list[dict], cut: int, dtype: np.dtype, chunk: int = 1 << 22) -> tuple[list, list]:
    """Move every token from position `cut` of the stream in the train shards to val shards:
    whole shards past the cut are renamed, the one shard the cut falls in has its tail copied
    (in chunks) and is truncated. Returns (train shards, val shards)."""
    train: list[dict] = []
    val: list[dict] = []
    start = 0
    for shard in shards:
        n, path = shard["tokens"], out / shard["file"]
        if start + n <= cut:
            train.append(shard)
        elif start >= cut:
            name = f"val_{len(val):06d}.bin"
            os.replace(path, out / name)
            val.append({"file": name, "tokens": n})
        else:
            keep = cut - start
            name = f"val_{len(val):06d}.bin"
            with open(path, "rb") as src, open(out / name, "wb") as dst:
                src.seek(keep * dtype.itemsize)
                shutil.copyfileobj(src, dst, chunk)
            os.truncate(path, keep * dtype.itemsize)
            train.append({"file": shard["file"], "tokens": keep})
            val.append({"file": name, "tokens": n - keep})
        start += n
    return train or [_empty_shard(out, "train")], val or [_empty_shard(out, "val")]


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
    max_tokens: int | None = None,
    val_tokens: int | None = None,
    workers: int | None = None,
    unknown_chars: str = "error",
    check_splits: Callable[[int, int], None] | None = None,
    tokenizer_sample: int | None = None,
) -> dict[str, Any]:
    """Tokenize a corpus into a dataset directory and return its meta.json contents.

    The corpus is read as a stream: batches of documents are tokenized in `workers` processes
    (default: usable_cores(); 1 = in this process; the output is the same byte for byte), and their
    tokens, in corpus order, are appended to train shards of shard_tokens tokens as they fill, so
    memory stays bounded by a few batches per worker whatever the corpus's size (a .txt file is read
    in pieces, corpus_files.text_pieces; a .jsonl line or a Hugging Face row is held whole). max_tokens stops reading once the stream holds that many tokens (EOS included;
    the last document may be cut). At the end the validation split, the last val_tokens tokens of
    the stream (default: the last val_fraction of them, at least 2), is moved out of the train
    shards. Does nothing (and returns the existing meta) when out_dir already holds this corpus,
    tokenized the same way, unless force=True. Tokenizer 'bpe:N' first trains a byte-level BPE of N
    tokens on the corpus's first tokenizer_sample bytes (default: all of it).

    unknown_chars says what becomes of the characters a given character-level tokenizer has no token
    for: "error" (UnknownCharacterError naming them), "drop" (left out), or a character of its vocabulary
    that takes their place.

    check_splits(train_tokens, val_tokens), when given, is called before the dataset is written: what it
    raises (a dataset too small for its use) leaves nothing behind, as every failure does.

    Raises DataError for an unusable source, an empty or whitespace-only corpus or bad settings,
    FileAccessError when out's disk is full (nothing is left half-written).
    """
    from tqdm.auto import tqdm

    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    if max_tokens is not None and max_tokens < 2:
        raise DataError(f"max_tokens must be at least 2 (a train and a validation token), got {max_tokens}")
    if val_tokens is not None and val_tokens < 2:
        raise DataError(f"val_tokens must be at least 2, got {val_tokens}")
    if max_tokens is not None and val_tokens is not None and val_tokens >= max_tokens:
        raise DataError(f"val_tokens ({val_tokens}) must be smaller than max_tokens ({max_tokens})")
    if tokenizer_sample is not None and tokenizer_sample < 1:
        raise DataError(f"tokenizer_sample must be at least 1 byte, got {tokenizer_sample}")
    bpe_size = None
    if isinstance(tokenizer, str):
        from .hf_tokenizer import parse_bpe_name
        try:
            bpe_size = parse_bpe_name(check_tokenizer_name(tokenizer))
        except ValueError as e:
            raise DataError(str(e)) from None
    workers = usable_cores() if workers is None else workers
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    corpus = source if isinstance(source, Corpus) else resolve_corpus(source, text_field, hf_split)
    out = Path(out_dir)
    request = {"source": corpus.name, "source_checksums": corpus.fingerprint, "val_fraction": val_fraction,
               "tokenizer_request": tokenizer if isinstance(tokenizer, str) else tokenizer.kind}
    # Only set when given, so that datasets prepared before these settings existed stay up to date.
    given = (("max_tokens", max_tokens), ("val_tokens", val_tokens),
             ("unknown_chars", unknown_chars if unknown_chars != "error" else None),
             ("shard_tokens", shard_tokens if shard_tokens != DEFAULT_SHARD_TOKENS else None),
             ("tokenizer_sample", tokenizer_sample))
    request.update({k: v for k, v in given if v is not None})
    if not force and (out / META_FILE).is_file():
        try:
            meta = read_meta(out)
        except DataError:
            meta = {}
        same_tokenizer = isinstance(tokenizer, str) or meta.get("tokenizer") == tokenizer.spec()
        if (same_tokenizer and all(meta.get(k) == v for k, v in request.items())
                and not {k for k, _ in given} & (set(meta) - set(request))):
            return meta
    if bpe_size is not None:
        tok = _train_bpe(corpus, bpe_size, tokenizer_sample, progress)
    elif isinstance(tokenizer, str):
        tok = _char_vocabulary(corpus, max_tokens) if tokenizer == "char" else get_tokenizer(tokenizer)
    else:
        tok = tokenizer
    if unknown_chars not in ("error", "drop") and isinstance(tok, CharTokenizer) and unknown_chars not in tok.stoi:
        raise DataError(f"unknown_chars {unknown_chars!r} is not in the character vocabulary, so it cannot take "
                        "the place of the characters that are not; choose one that is, or 'drop'")
    dtype = token_dtype(tok.vocab_size)
    budget = max_tokens if max_tokens is not None else float("inf")

    _check_out_dir(out)
    # The pool is started first, before the corpus's reader or the progress bar start any thread.
    with (no_folders_left_on_failure(out), _disk_full_is_one_line(out),
          _EncodingPool(_Encoder(tok, dtype, unknown_chars), workers) as pool, atomic_dir(out) as tmp):
        writer = _ShardWriter(tmp, "train", shard_tokens)
        n_docs = n_bytes = 0
        documents = iter(corpus.documents())
        if tokenizer == "char" and max_tokens is not None:
            # the vocabulary holds the characters up to the budget only: the last document is cut there
            # before it is encoded (its characters past the budget may be missing from the vocabulary)
            documents = _char_budget(documents, max_tokens)
        first = next(documents, None)  # opens the source: a source that cannot be read fails before the bar
        documents = itertools.chain([first], documents) if first is not None else iter(())
        documents, text_seen = _watch_for_text(documents)
        try:
            # Off a terminal (a log file, a pipe) the bar is redrawn every 10 s instead of 10 times a second.
            with tqdm(desc=f"tokenizing {corpus.name}", total=max_tokens, unit="tok", unit_scale=True,
                      disable=not progress, mininterval=0.1 if sys.stderr.isatty() else 10) as bar:
                for tokens, docs, size in pool.imap(_batched(documents)):
                    if writer.tokens + len(tokens) >= budget:  # the budget ends inside this batch
                        tokens = tokens[:int(budget) - writer.tokens]
                        docs = int((tokens == tok.eos_id).sum()) + int(len(tokens) > 0 and tokens[-1] != tok.eos_id)
                        size = len(tok.decode_bytes(tokens[tokens != tok.eos_id].tolist()))
                    writer.write(tokens)
                    n_docs += docs
                    n_bytes += size
                    bar.update(len(tokens))
                    if writer.tokens >= budget:
                        break
        finally:
            writer.close()
        total = writer.tokens
        if n_docs == 0 or total < 2:
            raise DataError(f"corpus {corpus.name!r} is empty: it holds no text to train on")
        if not text_seen:
            raise DataError(f"corpus {corpus.name!r} holds only whitespace (spaces, tabs, line breaks): no text to "
                            "train on")
        # The validation split: the last val_tokens (else val_fraction, at least 2) tokens of the stream.
        n_val = val_tokens if val_tokens is not None else max(2, int(total * val_fraction))
        if val_tokens is not None and n_val >= total:
            raise DataError(f"val_tokens ({n_val:,}) must be smaller than the corpus's {total:,} tokens")
        cut = total - n_val
        if check_splits is not None:
            check_splits(cut, n_val)
        train_shards, val_shards = _split_tail(tmp, writer.shards, cut, dtype)
        val_bytes = pool.shard_bytes([(tmp / s["file"], s["tokens"]) for s in val_shards])
        tok.save(tmp / TOKENIZER_DIR)
        split = {"method": "tail", "val_fraction": val_fraction}
        if val_tokens is not None:
            split["val_tokens"] = val_tokens
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
            "bytes_per_token": n_bytes / total,
            "val_bytes": val_bytes,
            "val_bytes_per_token": val_bytes / n_val,
            "split": split,
            "shards": {"train": train_shards, "val": val_shards},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    return meta


@contextlib.contextmanager
def _disk_full_is_one_line(out: Path) -> Iterator[None]:
    """Inside it, a write that finds no room (a full disk, a quota) is a FileAccessError naming out's
    disk; atomic_dir has removed what was written by then, and a dataset already at out is untouched."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        where = f" ({e.filename})" if e.filename else ""
        raise FileAccessError(f"the disk of {out} is full{where}: {e.strerror}; nothing was written: free some "
                              "space and prepare again") from None
class _TextSeen:
    """Whether any of the documents _watch_for_text passed on held more than whitespace."""

    def __init__(self) -> None:
        self.seen = False

    def __bool__(self) -> bool:
        return self.seen


def _watch_for_text(documents: Iterator[str]) -> tuple[Iterator[str], _TextSeen]:
    """documents as they are, and a flag that turns true once one of them has text besides whitespace."""
    flag = _TextSeen()

    def watched() -> Iterator[str]:
        for doc in documents:
            if not flag.seen and not doc.isspace() and doc:
                flag.seen = True
            yield doc

    return watched(), flag


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
