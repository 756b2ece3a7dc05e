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
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from .errors import DataError
from .model import GPT, IGNORE_INDEX
from .tokenizer import Tokenizer

# Logits of one batch are (windows, context, vocab) floats; keep them near this many bytes.
_LOGITS_BUDGET_BYTES = 512 * 2**20
TEXT_SUFFIXES = (".txt", ".md", ".text")


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
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens}")
        ids = ids[:max_tokens]
    if bos:
        ids = [tokenizer.eos_id] + ids
    context = context or model.config.n_positions
    stride = stride or max(1, context // 2)
    nll, count, windows = sequence_nll(model, ids, context, stride, batch_size, device)
    scored = [ids[j] for w in windows for j in range(w.first, w.end)]
    n_bytes = len(tokenizer.decode_bytes(scored))
    loss = nll / count
    return EvalResult(
        loss=loss, perplexity=math.exp(loss), bits_per_byte=nll / math.log(2) / max(n_bytes, 1),
        tokens=count, bytes=n_bytes, windows=len(windows), context=context, stride=stride,
    )


def read_eval_text(source: str | os.PathLike, separator: str = "\n\n") -> str:
    """The text of a file, or of the text files under a directory (sorted, joined by `separator`)."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"evaluation data {source} does not exist; give a text file or a directory of them")
    files: Iterable[Path] = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{f} is not UTF-8 text; convert it (e.g. iconv -t UTF-8) or leave it out") from None
    if not texts:
        raise DataError(f"{source} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    text = separator.join(texts)
    if not text.strip():
        raise DataError(f"{source} is empty")
    return text
