"""The tokenizer a dataset is prepared with, for `prepare_corpus`: the one given, one named
('gpt2', 'byte'), or one the corpus makes: 'char' (the corpus's characters) or 'bpe:N' (a byte-level
BPE of N tokens trained on the corpus's first bytes).

`char_budget` cuts the documents at a token budget the way both the vocabulary and the encoding see
them, so that a character-level vocabulary holds exactly the characters that are encoded.
"""

from __future__ import annotations

import sys
from typing import Iterable, Iterator

from ..errors import DataError
from ..tokenizer import CharTokenizer, Tokenizer, get_tokenizer
from .encoding import utf8_text
from .sources import Corpus
from .text_files import Part


def corpus_tokenizer(corpus: Corpus, tokenizer: str | Tokenizer, bpe_size: int | None, max_tokens: int | None,
                     sample_bytes: int | None, unknown_chars: str, progress: bool) -> Tokenizer:
    """The tokenizer to encode corpus with: a BPE of bpe_size tokens trained on its first sample_bytes
    bytes when bpe_size is given, the characters of its first max_tokens tokens for 'char', else the
    named or given tokenizer. Raises DataError for an empty corpus, or an unknown_chars stand-in that
    a character vocabulary lacks."""
    if bpe_size is not None:
        tok = _train_bpe(corpus, bpe_size, sample_bytes, progress)
    elif isinstance(tokenizer, str):
        tok = _char_vocabulary(corpus, max_tokens) if tokenizer == "char" else get_tokenizer(tokenizer)
    else:
        tok = tokenizer
    if unknown_chars not in ("error", "drop") and isinstance(tok, CharTokenizer) and unknown_chars not in tok.stoi:
        raise DataError(f"unknown_chars {unknown_chars!r} is not in the character vocabulary, so it cannot take "
                        "the place of the characters that are not; choose one that is, or 'drop'")
    return tok


def char_budget(documents: Iterable[str], max_tokens: int | None) -> Iterator[str]:
    """The documents that fill max_tokens character tokens (one per character, one EOS per non-empty
    document), the last one cut at the budget: all of them when max_tokens is None."""
    budget = max_tokens if max_tokens is not None else float("inf")
    for doc in documents:
        if budget <= 0:
            return
        whole = not isinstance(doc, Part)  # a Part's document goes on: its EOS comes after its last piece
        doc = utf8_text(doc)[0]
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
        doc, raw = utf8_text(doc)
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

    from ..console import say
    from ..hf_tokenizer import train_bpe

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
    for doc in char_budget(corpus.documents(), max_tokens):
        chars.update(doc)
    if not chars:
        raise DataError(f"corpus {corpus.name!r} is empty: it holds no text")
    return CharTokenizer(chars)
