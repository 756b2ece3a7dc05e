"""Loss, perplexity and bits per byte of a model on a text, with sliding-window evaluation.

A text longer than the context is scored in windows of `context` tokens that start `stride`
tokens apart; each window scores only the tokens the previous windows did not, so every
token is predicted once, with at least context - stride tokens of left context. This is the
Hugging Face perplexity recipe: with the same windows it gives the same loss as
GPT2LMHeadModel(input_ids, labels=...) (the first token of a window has no prediction; with
stride == context the token at each window start is therefore never scored).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from ..model import GPT, IGNORE_INDEX
from ..tokenizer import Tokenizer

# Logits of one batch are (windows, context, vocab) floats; keep them near this many bytes.
_LOGITS_BUDGET_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go through the model; targets at positions [first, end) are scored."""

    begin: int
    end: int
    first: int


@dataclass
class EvalResult:
    loss: float  # mean negative log-likelihood per scored token, in nats
    perplexity: float  # exp(loss)
    bits_per_byte: float  # total NLL in bits over the UTF-8 bytes of the scored tokens
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes those tokens decode to
    windows: int
    context: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows of the Hugging Face perplexity recipe over a sequence of n_tokens."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}), got {stride}")
    if n_tokens < 2:
        raise DataError(f"the text has {n_tokens} token(s); at least 2 are needed to score a prediction")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append(Window(begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@torch.inference_mode()
def sequence_nll(model: GPT, ids: list[int], context: int | None = None, stride: int | None = None,
                 batch_size: int | None = None, device: str | torch.device = "cpu") -> tuple[float, int, list[Window]]:
    """Summed NLL (nats) and count of the tokens of `ids` scored by sliding windows.

    Windows are batched; a shorter window is right-padded, which causal attention makes
    harmless to the real positions, and its padding targets are ignored.
    """
    context = context or model.config.n_positions
    if context > model.config.n_positions:
        raise ValueError(f"context {context} exceeds the model's n_positions ({model.config.n_positions})")
    stride = stride or max(1, context // 2)
    windows = sliding_windows(len(ids), context, stride)
    if batch_size is None:
        batch_size = max(1, _LOGITS_BUDGET_BYTES // (4 * context * model.config.vocab_size))
    model.eval()
    data = torch.tensor(ids, dtype=torch.long)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        T = max(w.end - w.begin - 1 for w in group)
        x = torch.zeros(len(group), T, dtype=torch.long)
        y = torch.full((len(group), T), IGNORE_INDEX, dtype=torch.long)
        for row, w in enumerate(group):
            n = w.end - w.begin - 1
            x[row, :n] = data[w.begin:w.end - 1]
            # position j predicts token begin + j + 1; only tokens from `first` on are new.
            skip = w.first - w.begin - 1
            y[row, skip:n] = data[w.first:w.end]
        logits, _ = model(x.to(device))  # (B, T, V)
        y = y.to(device)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum").item()
        count += int((y != IGNORE_INDEX).sum())
    return total, count, windows


def evaluate_ids(model: GPT, ids: list[int], tokenizer: Tokenizer, context: int | None = None,
                 stride: int | None = None, batch_size: int | None = None,
                 device: str | torch.device = "cpu") -> EvalResult:
    """Loss, perplexity and bits per byte of a token sequence. Bits per byte divide the NLL of all
    scored tokens by the UTF-8 bytes of the scored tokens other than end-of-text (which stand for no text)."""
    context = context or model.config.n_positions
    stride = stride or max(1, context // 2)
    nll, count, windows = sequence_nll(model, ids, context, stride, batch_size, device)
    scored = [ids[j] for w in windows for j in range(w.first, w.end) if ids[j] != tokenizer.eos_id]
    n_bytes = len(tokenizer.decode_bytes(scored))
    loss = nll / count
    return EvalResult(
        loss=loss, perplexity=math.exp(loss), bits_per_byte=nll / math.log(2) / max(n_bytes, 1),
        tokens=count, bytes=n_bytes, windows=len(windows), context=context, stride=stride,
    )


def evaluate_text(model: GPT, tokenizer: Tokenizer, text: str, context: int | None = None,
                  stride: int | None = None, bos: bool = True, max_tokens: int | None = None,
                  batch_size: int | None = None, device: str | torch.device = "cpu") -> EvalResult:
    """Loss, perplexity and bits per byte of `text`.

    bos=True puts the tokenizer's end-of-text token before the text (as GPT-2 was trained,
    documents separated by it), so every token of the text is scored; bos=False is the plain
    recipe, where the first token is only context.
    """
    if not text:
        raise DataError("the evaluation text is empty")
    ids = ([tokenizer.eos_id] if bos else []) + tokenizer.encode(text)
    return evaluate_ids(model, _head(ids, max_tokens), tokenizer, context, stride, batch_size, device)


def _head(ids: list[int], max_tokens: int | None) -> list[int]:
    if max_tokens is None:
        return ids
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    return ids[:max_tokens]


def load_eval_tokens(source: str, tokenizer: Tokenizer, split: str | None = None, text_field: str = "text",
                     bos: bool = True, max_tokens: int | None = None, skip_unknown: bool = False,
                     dropped: Counter | None = None) -> list[int]:
    """Token ids to evaluate on, from a prepared dataset directory (its `split`, default "val"),
    or from any corpus `simplegpt prepare` accepts (file, folder, glob, URL, 'shakespeare',
    'hf:NAME[:CONFIG]' with split default "test"), documents separated by end-of-text.

    A character a character-level tokenizer has no token for raises UnknownCharacterError, unless
    skip_unknown: the text is then scored without those characters, which are counted in `dropped`
    (character -> times left out) when it is given."""
    from ..data.layout import META_FILE
    from ..data.shards import TokenShards, read_meta
    from ..data.sources import resolve_corpus

    if (Path(source) / META_FILE).is_file():
        meta = read_meta(source)
        if meta.get("tokenizer") != tokenizer.spec():
            raise DataError(f"{source} was prepared with a different tokenizer ({meta.get('tokenizer', {}).get('type')}) "
                            f"than the model's ({tokenizer.kind}); prepare it again with the model's tokenizer")
        shards = TokenShards(source, split or "val")
        ids = np.concatenate(shards.arrays).tolist() if shards.arrays else []
        return _head(ids, max_tokens)
    corpus = resolve_corpus(source, text_field=text_field, hf_split=split or "test")
    ids: list[int] = []
    for doc in corpus.documents():
        if bos or ids:
            ids.append(tokenizer.eos_id)
        if skip_unknown:
            kept, n = tokenizer.known_text(doc)
            if n and dropped is not None:
                known = set(kept)  # every character the tokenizer knows is kept, no other
                dropped.update(c for c in doc if c not in known)
            doc = kept
        ids.extend(tokenizer.encode(doc))
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if len(ids) <= int(bos):
        raise DataError(f"{source} holds no text to evaluate on")
    return _head(ids, max_tokens)
