"""Sampling: how the next token is picked from the logits. One function, sample_next_token, serves
the engine, and through it the CLI, the server and the tutorial's generate_text."""

from __future__ import annotations

import math
import random
import struct
from dataclasses import dataclass
from typing import Sequence

import torch

MAX_LOGPROBS = 20  # most alternatives SamplingParams.logprobs may ask for
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1  # a seed is any signed or unsigned 64-bit integer
# top_p is "reached" by a set of tokens whose mass is within this of it: softmax's fp32 probabilities
# carry ~1e-7 relative error, so a set whose exact mass is p (0.5 + 0.3 for p = 0.8) can add up a few
# fp32 steps short of it, and would then drag in one token more than the smallest set reaching p.
TOP_P_TOLERANCE = 1e-6
# A temperature below this samples greedily. logits / temperature overflows float32 (and the softmax
# gives NaN) once |logit| / temperature passes ~3.4e38, as 1 / 1e-38 does; long before that the
# distribution is the argmax anyway: at 1e-5 a token 0.001 below the best has odds e^-100 against it.
MIN_TEMPERATURE = 1e-5
_FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 (or any below MIN_TEMPERATURE, 1e-5) means
    greedy decoding.

    top_k 0 / top_p 1 / min_p 0 / repetition_penalty 1 switch that filter off. seed is any 64-bit
    integer (SEED_MIN..SEED_MAX, taken modulo 2^64: -1 is 2^64 - 1), and every one of those 2^64
    values gives its own samples. Row i of a batch samples with seed + i (modulo 2^64), so a prompt
    alone with seed s + i gives what it gives in row i.
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
        check_seed(self.seed)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (or None = off), "
                             f"got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is taken: temperature below MIN_TEMPERATURE (0 included)."""
        return self.temperature < MIN_TEMPERATURE


def check_seed(seed: int | None) -> None:
    """Raises ValueError (naming seed) unless seed is None or an integer in SEED_MIN..SEED_MAX."""
    if seed is not None and (not isinstance(seed, int) or not SEED_MIN <= seed <= SEED_MAX):
        raise ValueError(f"seed must be an integer from -2^63 to 2^64 - 1 (64 bits), got {seed!r}")


def seeded_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on device whose stream is set by all 64 bits of seed (taken modulo 2^64).

    CUDA's and MPS's Philox generators take a 64-bit seed as it is. The CPU's Mersenne Twister
    keeps only the low 32 bits of torch's manual_seed (so 0, 2^32 and 2^63 would give one stream):
    a seed of 2^32 or more fills its 624-word state from all its bits instead, as Python's
    random.seed does (MT19937's init_by_array). Seeds below 2^32 keep the streams they always had.
    """
    seed %= 2**64
    gen = torch.Generator(device=device)
    if gen.device.type != "cpu" or seed < 2**32:
        return gen.manual_seed(seed)
    words = random.Random(seed).getstate()[1][:624]  # init_by_array([low 32 bits, high 32 bits])
    # torch's CPU state (CPUGeneratorImplState): u64 seed, i32 left, i32 seeded, u64 next, u64 state[624],
    # then the cached normal samples (none: zeros); left=1, next=0 as manual_seed leaves it (the first
    # draw twists the state).
    state = bytearray(gen.get_state().numel())
    struct.pack_into("<QiiQ624Q", state, 0, seed, 1, 1, 0, *words)
    gen.set_state(torch.frombuffer(state, dtype=torch.uint8))
    return gen


@dataclass
class TokenLogprobs:
    """A generated token's log-probability under the model (its raw logits: before the repetition
    penalty, temperature and filters), and the most likely tokens at that step, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int, vocab: int | None = None) -> list[TokenLogprobs]:
    """(B, V) logits and the (B,) tokens drawn from them -> each token's TokenLogprobs with k alternatives,
    taken from the first `vocab` ids (all V when None: ids past a tokenizer's have no text)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, tokens.view(-1, 1)).view(-1).tolist()
    top_v, top_i = lp[:, :vocab].topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    return [TokenLogprobs(t, c, list(zip(i, v))) for t, c, i, v in
            zip(tokens.tolist(), chosen, top_i.tolist(), top_v.tolist())]


def sampling_probs(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution a token is drawn from: (B, V) logits -> (B, V) probabilities.

    Order as in Hugging Face: repetition penalty, temperature, top-k, top-p, min-p.
    seen (B, V) bool marks tokens already in a row's context, for the repetition penalty.
    Every value SamplingParams accepts gives a distribution (no NaN): scaled logits past float32's
    range saturate at its largest finite value, so tokens that overflow together tie.
    """
    logits = apply_repetition_penalty(logits.float(), params.repetition_penalty, seen)
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = (logits / params.temperature).clamp(-_FLOAT32_MAX, _FLOAT32_MAX)
    if 0 < params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose total probability reaches top_p (within
        # TOP_P_TOLERANCE): a token stays while the mass of the tokens ranked above it is below that.
        # The mass is summed in float64, where a running fp32 sum of 50k tokens would drift; ties keep
        # the lower token id (a stable sort); the most likely token always stays.
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        sorted64 = sorted_p.double()
        drop_sorted = sorted64.cumsum(-1) - sorted64 >= params.top_p - TOP_P_TOLERANCE  # (B, V)
        drop_sorted[:, 0] = False
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def apply_repetition_penalty(logits: torch.Tensor, penalty: float, seen: torch.Tensor | None) -> torch.Tensor:
    """CTRL's penalty: seen tokens' positive logits are divided by penalty, negative ones multiplied;
    (B, V) logits and (B, V) bool seen -> (B, V) float32 logits. A result past float32's range
    saturates at its largest finite value (a tiny penalty would make it inf, and the softmax NaN)."""
    if penalty == 1.0 or seen is None:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty).clamp(-_FLOAT32_MAX, _FLOAT32_MAX)
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
