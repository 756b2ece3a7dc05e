"""Preparing a dataset: `prepare_corpus(source, out_dir, tokenizer)` turns a corpus into a folder
of token shards (its names are data.layout's):

    meta.json             tokenizer spec, vocab size, dtype, token and byte counts, split, source checksums
    tokenizer/            the tokenizer
    train_000000.bin ...  token shards: flat little-endian uint16 (vocab < 65536) or uint32
    val_000000.bin ...    the validation split: the last val_fraction (or val_tokens) of the token stream

prepare_corpus runs these steps, each a function:

1. `_check_settings`: a setting out of range fails before any work;
2. `_request` and `_up_to_date`: what meta.json records of how the dataset was asked for; a folder
   that already holds it (same source checksums and settings) is left as it is;
3. `vocabulary.corpus_tokenizer`: the tokenizer, made from the corpus for 'char' and 'bpe:N';
4. `_tokenize_into_shards`: the corpus is a stream of documents, separated by the tokenizer's EOS
   token (a .txt file is one document, read in pieces: data.text_files); batches of documents are
   tokenized in worker processes (`encoding.EncodingPool`, results in corpus order, a few batches
   per worker in flight) and appended to train shards as they fill (`shard_writer.ShardWriter`), so
   memory is bounded whatever the corpus's size and the output does not depend on the number of
   workers; max_tokens stops reading at a token budget;
5. `_validation_tokens` and `shard_writer.split_tail`: the validation split is the stream's tail,
   moved out of the last train shards once the stream's length is known;
6. `_meta`: meta.json's contents.

The folder is written into a temporary sibling and swapped in (`atomic_dir`), so an interrupted
prepare never leaves a half-written dataset.
"""

from __future__ import annotations

import contextlib
import decimal
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..atomic import atomic_dir, no_folders_left_on_failure
from ..errors import DISK_FULL, DataError, FileAccessError
from ..tokenizer import Tokenizer, check_tokenizer_name
from .encoding import Encoder, EncodingPool, batched, usable_cores
from .layout import FORMAT, FORMAT_VERSION, META_FILE, TOKENIZER_DIR, TRAIN, VAL, is_dataset_dir, token_dtype
from .shard_writer import ShardWriter, split_tail
from .shards import read_meta
from .sources import Corpus, resolve_corpus
from .vocabulary import char_budget, corpus_tokenizer

DEFAULT_SHARD_TOKENS = 100_000_000
# Settings meta.json records only when they differ from these defaults, so that datasets prepared
# before these settings existed stay up to date.
_OPTIONAL_SETTINGS = {"max_tokens": None, "val_tokens": None, "unknown_chars": "error",
                      "shard_tokens": DEFAULT_SHARD_TOKENS, "tokenizer_sample": None}


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
    in pieces, text_files.text_pieces; a .jsonl line or a Hugging Face row is held whole).
    max_tokens stops reading once the stream holds that many tokens (EOS included; the last
    document may be cut). At the end the validation split, the last val_tokens tokens of
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
    bpe_size = _check_settings(tokenizer, val_fraction, shard_tokens, max_tokens, val_tokens, tokenizer_sample,
                               workers)
    workers = usable_cores() if workers is None else workers
    corpus = source if isinstance(source, Corpus) else resolve_corpus(source, text_field, hf_split)
    out = Path(out_dir)
    request = _request(corpus, tokenizer, val_fraction, max_tokens=max_tokens, val_tokens=val_tokens,
                       unknown_chars=unknown_chars, shard_tokens=shard_tokens, tokenizer_sample=tokenizer_sample)
    if not force and (meta := _up_to_date(out, tokenizer, request)) is not None:
        return meta
    tok = corpus_tokenizer(corpus, tokenizer, bpe_size, max_tokens, tokenizer_sample, unknown_chars, progress)
    dtype = token_dtype(tok.vocab_size)

    _check_out_dir(out)
    # The pool is started first, before the corpus's reader or the progress bar start any thread.
    with (no_folders_left_on_failure(out), _disk_full_is_one_line(out),
          EncodingPool(Encoder(tok, dtype, unknown_chars), workers) as pool, atomic_dir(out) as tmp):
        stream = _tokenize_into_shards(corpus, tok, pool, ShardWriter(tmp, TRAIN, shard_tokens), max_tokens,
                                       cut_for_chars=tokenizer == "char", progress=progress)
        n_val = _validation_tokens(stream.tokens, val_fraction, val_tokens)
        if check_splits is not None:
            check_splits(stream.tokens - n_val, n_val)
        shards = dict(zip((TRAIN, VAL), split_tail(tmp, stream.shards, stream.tokens - n_val, dtype)))
        val_bytes = pool.shard_bytes([(tmp / s["file"], s["tokens"]) for s in shards[VAL]])
        tok.save(tmp / TOKENIZER_DIR)
        split = {"method": "tail", "val_fraction": val_fraction}
        if val_tokens is not None:
            split["val_tokens"] = val_tokens
        meta = _meta(request, tok, dtype, stream, n_val=n_val, val_bytes=val_bytes, split=split, shards=shards)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    return meta


def _check_settings(tokenizer: str | Tokenizer, val_fraction: float, shard_tokens: int, max_tokens: int | None,
                    val_tokens: int | None, tokenizer_sample: int | None, workers: int | None) -> int | None:
    """DataError for a setting out of range or an unknown tokenizer name; the N of 'bpe:N', else None."""
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
        from ..hf_tokenizer import parse_bpe_name
        try:
            bpe_size = parse_bpe_name(check_tokenizer_name(tokenizer))
        except ValueError as e:
            raise DataError(str(e)) from None
    if workers is not None and workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    return bpe_size


def _request(corpus: Corpus, tokenizer: str | Tokenizer, val_fraction: float, **optional: Any) -> dict[str, Any]:
    """What meta.json records of how the dataset was asked for: the source, its checksums, the split and
    the tokenizer asked for, and each of _OPTIONAL_SETTINGS (keyword arguments) that differs from its
    default."""
    request = {"source": corpus.name, "source_checksums": corpus.fingerprint, "val_fraction": val_fraction,
               "tokenizer_request": tokenizer if isinstance(tokenizer, str) else tokenizer.kind}
    request.update({k: v for k, v in optional.items() if v != _OPTIONAL_SETTINGS[k]})
    return request


def _up_to_date(out: Path, tokenizer: str | Tokenizer, request: dict[str, Any]) -> dict[str, Any] | None:
    """out's meta.json when out already holds the dataset `request` describes (a given tokenizer: that
    one), else None."""
    if not is_dataset_dir(out):
        return None
    try:
        meta = read_meta(out)
    except DataError:
        return None
    same_tokenizer = isinstance(tokenizer, str) or meta.get("tokenizer") == tokenizer.spec()
    if (same_tokenizer and all(meta.get(k) == v for k, v in request.items())
            and not set(_OPTIONAL_SETTINGS) & (set(meta) - set(request))):
        return meta
    return None


@dataclass
class _Stream:
    """What _tokenize_into_shards wrote: the train shards ({"file", "tokens"}), the token count, and
    the documents and UTF-8 bytes of text they hold."""

    shards: list[dict]
    tokens: int
    documents: int
    bytes: int


def _tokenize_into_shards(corpus: Corpus, tok: Tokenizer, pool: EncodingPool, writer: ShardWriter,
                          max_tokens: int | None, cut_for_chars: bool, progress: bool) -> _Stream:
    """Tokenize corpus's documents in pool, in corpus order, into writer's shards, up to max_tokens
    tokens (the last batch cut there); with a progress bar of the tokens. Raises DataError for a
    corpus that holds no text, or only whitespace."""
    from tqdm.auto import tqdm

    budget = max_tokens if max_tokens is not None else float("inf")
    n_docs = n_bytes = 0
    documents = iter(corpus.documents())
    if cut_for_chars and max_tokens is not None:
        # the vocabulary holds the characters up to the budget only: the last document is cut there
        # before it is encoded (its characters past the budget may be missing from the vocabulary)
        documents = char_budget(documents, max_tokens)
    first = next(documents, None)  # opens the source: a source that cannot be read fails before the bar
    documents = itertools.chain([first], documents) if first is not None else iter(())
    documents, text_seen = _watch_for_text(documents)
    try:
        # Off a terminal (a log file, a pipe) the bar is redrawn every 10 s instead of 10 times a second.
        with tqdm(desc=f"tokenizing {corpus.name}", total=max_tokens, unit="tok", unit_scale=True,
                  disable=not progress, mininterval=0.1 if sys.stderr.isatty() else 10) as bar:
            for tokens, docs, size in pool.imap(batched(documents)):
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
    if n_docs == 0 or writer.tokens < 2:
        raise DataError(f"corpus {corpus.name!r} is empty: it holds no text to train on")
    if not text_seen:
        raise DataError(f"corpus {corpus.name!r} holds only whitespace (spaces, tabs, line breaks): no text to "
                        "train on")
    return _Stream(writer.shards, writer.tokens, n_docs, n_bytes)


def _validation_tokens(total: int, val_fraction: float, val_tokens: int | None) -> int:
    """How many tokens of the stream's tail make the validation split: val_tokens, else val_fraction of
    the total (at least 2). DataError when val_tokens leaves no training tokens."""
    n_val = val_tokens if val_tokens is not None else max(2, int(total * val_fraction))
    if val_tokens is not None and n_val >= total:
        raise DataError(f"val_tokens ({n_val:,}) must be smaller than the corpus's {total:,} tokens")
    return n_val


def _meta(request: dict[str, Any], tok: Tokenizer, dtype: np.dtype, stream: _Stream, n_val: int, val_bytes: int,
          split: dict[str, Any], shards: dict[str, list[dict]]) -> dict[str, Any]:
    """meta.json's contents."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **request,
        "tokenizer": tok.spec(),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": dtype.name,
        "documents": stream.documents,
        "bytes": stream.bytes,
        "tokens": {TRAIN: stream.tokens - n_val, VAL: n_val},
        "bytes_per_token": stream.bytes / stream.tokens,
        "val_bytes": val_bytes,
        "val_bytes_per_token": val_bytes / n_val,
        "split": split,
        "shards": shards,
    }


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


_COUNT_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12}


def parse_count(text: str | int) -> int:
    """A count written as '10M', '1.5B', '500k', '2_000_000' or '1e9' -> int (k = 10^3, M = 10^6,
    G or B = 10^9, T = 10^12, case-insensitive): how prepare's counts (--max-tokens, --val-tokens,
    --shard-tokens) are written. Raises ValueError for anything else, negative numbers and fractions
    included."""
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
