"""Corpus sources: a source string to a re-iterable stream of documents with a fingerprint.

`resolve_corpus(source)` reads 'shakespeare' (the embedded plays, `data.shakespeare`),
'tinyshakespeare' and http(s) URLs (downloaded once into the cache folder), 'hf:NAME[:CONFIG]'
(a Hugging Face dataset, streamed) and local .txt/.md/.jsonl files, folders and globs
(`data.text_files` finds them and reads a text file in pieces). A .txt file is one document,
a .jsonl line is one, a Hugging Face row is one. The fingerprint (sha256 of each file, or the
dataset's name and split) is what `prepare_corpus` compares to know a dataset is up to date.

A new kind of source is a function here that returns a `Corpus`, and a branch in resolve_corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..errors import DataError
from ..files import cache_dir, sha256_file
from ..hub import OFFLINE_HINT, hub_reachable, offline_mode, quiet_hub_logs
from .shakespeare import shakespeare_documents, shakespeare_fingerprint
from .text_files import glob_files, text_pieces

TEXT_SUFFIXES = (".txt", ".md", ".text")
URL_ALIASES = {
    "tinyshakespeare": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
}


@dataclass
class Corpus:
    """A re-iterable stream of documents with a fingerprint that changes when the text does."""

    name: str
    documents: Callable[[], Iterable[str]]
    fingerprint: dict[str, str]


def resolve_corpus(source: str, text_field: str = "text", hf_split: str = "train") -> Corpus:
    """A Corpus from a source string: 'shakespeare', 'tinyshakespeare', a URL, 'hf:NAME[:CONFIG]',
    or local .txt/.md/.jsonl files, folders and globs. Raises DataError for a source that is not
    there or cannot be read (a download that fails, a missing 'datasets' extra, a glob matching nothing)."""
    if not source or not source.strip():
        raise DataError("no corpus given: pass a file, folder, glob, URL, 'shakespeare' or 'hf:NAME'")
    if source == "shakespeare":
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


def jsonl_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Each record of a JSONL file with where it stands ('FILE:LINE', lines numbered from 1), blank lines
    skipped and a leading byte-order mark ignored. DataError naming the line for one that is not UTF-8
    text or not one JSON value; OSError when the file cannot be read."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: the line is not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not a JSON line ({e.msg} at column {e.colno}); each line must be one "
                                "JSON object") from None
            except RecursionError:  # the json module recurses once per level of nesting
                raise DataError(f"{where}: the JSON is nested too deeply to read") from None
            yield where, record


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for where, row in jsonl_records(path):
        if not isinstance(row, dict) or text_field not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{where} has no {text_field!r} field (has {keys}); pass --text-field NAME")
        if not isinstance(row[text_field], str):
            raise DataError(f"{where} field {text_field!r} is not a string")
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
    """Fetch url once into the cache (temp file + rename) and return the cached path.
    Raises DataError when it cannot be fetched."""
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
