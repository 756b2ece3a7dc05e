"""Tokenizing a stream of documents on every core, for `prepare_corpus`.

`Encoder` turns a batch of documents into one token array (each non-empty document's tokens, then
EOS); `EncodingPool` runs it in worker processes over consecutive batches (`batched`) and yields the
results in corpus order, with only a few batches per worker in flight, so memory is bounded whatever
the corpus's size and the output is the same byte for byte for any number of workers. The pool also
counts the UTF-8 bytes a split's shards stand for (for bits per byte).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import SimpleGPTError
from ..tokenizer import ByteTokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer
from .text_files import Part

ENCODE_BATCH_DOCS = 256  # a batch for one worker: up to 256 documents or about 1 MiB of text
ENCODE_BATCH_CHARS = 1 << 20


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, as taskset and cgroup cpusets set it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def utf8_text(doc: str) -> tuple[str, bytes]:
    """doc and its UTF-8 bytes; lone surrogates (JSON can carry them) become U+FFFD first, as tiktoken does."""
    try:
        return doc, doc.encode("utf-8")
    except UnicodeEncodeError:
        doc = doc.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return doc, doc.encode("utf-8")


class Encoder:
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
        return Encoder, (self.tok, self.dtype.str, self.unknown)

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
            doc, raw = utf8_text(doc)
            ids = self.encode(doc)
            if len(ids) == 0:
                continue
            pieces += (ids, self.eos) if whole else (ids,)
            n_docs += whole
            n_bytes += len(raw)
        tokens = np.concatenate(pieces).astype(self.dtype, copy=False) if pieces else np.zeros(0, self.dtype)
        return tokens, n_docs, n_bytes


def batched(docs: Iterable[str], n: int = ENCODE_BATCH_DOCS, chars: int = ENCODE_BATCH_CHARS) -> Iterator[list[str]]:
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
_worker_encoder: Encoder | None = None


def _init_worker(encoder: Encoder, parent: int) -> None:
    global _worker_encoder
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the pool
    # A forked worker inherits the parent's Python handler for SIGTERM ('simplegpt prepare' exits through
    # it); run in a worker, that handler's exit joins the result queue's feeder thread, which a dead
    # parent's full pipe blocks forever. A worker signalled to end ends at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
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


class EncodingPool:
    """Runs an Encoder over batches of documents in `workers` processes (or in this one when
    workers == 1), yielding results in input order with at most IN_FLIGHT_PER_WORKER batches per
    worker in flight: the reader never runs ahead of the writer by more than that, so memory is
    bounded whatever the corpus's size (multiprocessing.Pool.imap would read the whole input ahead).

    Workers are forked where the platform can, all at once when the pool is made (before the
    corpus's reader or the progress bar start a thread), so they inherit the loaded tokenizer
    instead of importing simplegpt again. A worker that dies (killed, out of memory) ends the run
    with one line instead of a hang."""

    IN_FLIGHT_PER_WORKER = 4

    def __init__(self, encoder: Encoder, workers: int):
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

    def __enter__(self) -> "EncodingPool":
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
