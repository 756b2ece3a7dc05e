"""Sampling: how the next token is picked from the logits. One function, sample_next_token, serves
the engine, and through it the CLI, the server and the tutorial's generate_text."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

MAX_LOGPROBS = 20  # most alternatives SamplingParams.logprobs may ask for


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy decoding.

    top_k 0 / top_p 1 / min_p 0 / repetition_penalty 1 switch that filter off. Row i of a batch
    samples with seed + i, so a prompt alone with seed s + i gives what it gives in row i.
    Raises ValueError, naming the field, for a value out of range.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_at_eos: bool = True
    logprobs: int | None = None  # k: each new token's log-probability and the k most likely (Result.logprobs)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1) (0 = off), got {self.min_p!r}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (or None = off), "
                             f"got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class TokenLogprobs:
    """A generated token's log-probability under the model (its raw logits: before the repetition
    penalty, temperature and filters), and the most likely tokens at that step, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """(B, V) logits and the (B,) tokens drawn from them -> each token's TokenLogprobs with k alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, tokens.view(-1, 1)).view(-1).tolist()
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    return [TokenLogprobs(t, c, list(zip(i, v))) for t, c, i, v in
            zip(tokens.tolist(), chosen, top_i.tolist(), top_v.tolist())]


def sampling_probs(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution a token is drawn from: (B, V) logits -> (B, V) probabilities.

    Order as in Hugging Face: repetition penalty, temperature, top-k, top-p, min-p.
    seen (B, V) bool marks tokens already in a row's context, for the repetition penalty.
    """
    logits = apply_repetition_penalty(logits.float(), params.repetition_penalty, seen)
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose total probability reaches top_p:
        # a token stays when the mass of the tokens ranked above it is still below top_p.
        sorted_p, order = probs.sort(dim=-1, descending=True)
        above = sorted_p.cumsum(-1) - sorted_p
        drop_sorted = above >= params.top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def apply_repetition_penalty(logits: torch.Tensor, penalty: float, seen: torch.Tensor | None) -> torch.Tensor:
    """CTRL's penalty: seen tokens' positive logits are divided by penalty, negative ones multiplied."""
    if penalty == 1.0 or seen is None:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generators: Sequence[torch.Generator] | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The one sampling function: (B, V) logits -> (B,) token ids. Row i draws from generators[i]."""
    if params.greedy:
        return apply_repetition_penalty(logits.float(), params.repetition_penalty, seen).argmax(-1)
    probs = sampling_probs(logits, params, seen)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])
