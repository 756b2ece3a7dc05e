"""Text generation: a static KV cache, one sampling function, streaming and batched decoding.

    engine = Engine(model, tokenizer)
    [result] = engine.generate(["Once upon a time"], SamplingParams(max_new_tokens=50, temperature=0.8))
    for piece in engine.stream("Once upon a time", SamplingParams(temperature=0)):
        print(piece, end="", flush=True)

Batches of prompts are left-padded; each row has its own attention mask, positions and random
generator, so a prompt gives the same output in a batch as alone. When a row's context reaches
the model's window (n_positions) its oldest `window_shift` tokens are dropped and the rest are
re-encoded once (positions restart at 0, as in training), so generation never stops for length.
`Engine(..., use_cache=False)` runs the same loop re-encoding the whole context every step: the
reference the cached path is tested against. `Engine(..., compile=True)` runs each decode step as
one torch.compile'd function over the static cache (static_decode_step; CUDA graphs on CUDA).
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import math
import random
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from .accel.cpu import decode as native
from .model import GPT, MLP, Block, CausalSelfAttention, GPTConfig

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
MAX_LOGPROBS = 20  # most alternatives SamplingParams.logprobs may ask for


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy decoding.

    top_k 0 / top_p 1 / min_p 0 / repetition_penalty 1 switch that filter off. Row i of a batch
    samples with seed + i, so a prompt alone with seed s + i gives what it gives in row i.
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


@dataclass
class Result:
    """One generated sequence. text excludes the prompt, EOS and any stop string."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens reached)
    stop_reason: str | int | None = None  # the stop string matched, or the EOS id; None for "length"
    prompt_tokens: int = 0  # after left truncation to the window
    logprobs: list[TokenLogprobs] | None = None  # one per token_ids entry, with SamplingParams(logprobs=k)


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


class _LayerKV:
    """One layer's (B, H, max_len, D) key and value buffers inside a KVCache."""

    def __init__(self, cache: "KVCache", k: torch.Tensor, v: torch.Tensor):
        self.cache, self.k, self.v = cache, k, v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.cache.length, self.cache.length + k.size(2)
        B = k.size(0)
        if end > self.cache.max_len or B > self.k.size(0):
            raise ValueError(f"KV cache overflow: {end} positions x {B} rows do not fit its "
                             f"{self.cache.max_len} x {self.k.size(0)}; reset it or make a larger one")
        self.k[:B, :, start:end].copy_(k)
        self.v[:B, :, start:end].copy_(v)
        return self.k[:B, :, :end], self.v[:B, :, :end]  # views over the filled prefix, no copies


class KVCache:
    """Preallocated keys/values, (n_layer, batch, n_head, max_len, head_dim) each, written in place.

    The first `length` slots hold the keys/values seen so far (of the leading rows, when a batch
    has shrunk); GPT.forward(kv_cache=...) appends.
    Static shapes mean no allocation per decode step.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        max_len = max_len or config.n_positions
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        # Slots are always written before they are read, so the buffers need no zeroing.
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0
        self.layers = [_LayerKV(self, self.k[i], self.v[i]) for i in range(config.n_layer)]

    def reset(self) -> None:
        self.length = 0

    def advance(self, n: int) -> None:
        self.length += n

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Compact the batch to `rows` (indices of current rows), e.g. when others finished."""
        n, end = rows.numel(), self.length
        self.k[:, :n, :, :end] = self.k[:, rows, :, :end]
        self.v[:, :n, :, :end] = self.v[:, rows, :, :end]


class _TextAssembler:
    """Turns a row's token bytes into safe text pieces.

    Pieces never end inside a multi-byte character (an incremental UTF-8 decoder holds the
    partial bytes) and never contain the start of a possible stop string (held back until it
    is known not to be one), so their concatenation is exactly the final text.
    """

    def __init__(self, stops: Sequence[str]):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = stops
        self.text = ""
        self.emitted = 0
        self.matched: str | None = None

    def feed(self, data: bytes, final: bool = False) -> str:
        """Add bytes; return the newly safe text. Sets `matched` when a stop string appears."""
        before = len(self.text)
        self.text += self.decoder.decode(data, final=final)
        hold = 0
        if self.stops:
            longest = max(len(s) for s in self.stops)
            window_start = max(0, before - longest + 1)
            hits = [(i, s) for s in self.stops if (i := self.text.find(s, window_start)) >= 0]
            if hits:
                cut, self.matched = min(hits)
                self.text = self.text[:cut]
                final = True
            elif not final:
                hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        upto = len(self.text) - hold
        piece = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return piece


@dataclass
class _Row:
    prompt_len: int
    tokens: list[int]  # prompt (after truncation) + generated; the context is tokens[start:]
    generator: torch.Generator
    text: _TextAssembler | None
    start: int = 0
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None  # with SamplingParams(logprobs=k): one per generated token

    def result(self) -> Result:
        text = self.text.text if self.text is not None else ""
        return Result(text, list(self.generated), self.finish_reason or FINISH_LENGTH, self.stop_reason,
                      self.prompt_len, None if self.logprobs is None else list(self.logprobs))


class Stream:
    """An iterator of (row, text piece) events; `results` holds one Result per row once exhausted."""

    def __init__(self, events: Iterator[tuple[int, str]], rows: list[_Row]):
        self._events, self._rows = events, rows
        self.results: list[Result] | None = None

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> tuple[int, str]:
        try:
            return next(self._events)
        except StopIteration:
            self.results = [r.result() for r in self._rows]
            raise

    def close(self) -> None:
        """Stop generating (a reader that leaves early); the call's cache is released."""
        self._events.close()


class TextStream:
    """The text pieces of one prompt; `result` is set once the iteration has finished."""

    def __init__(self, stream: Stream):
        self._stream = stream
        self.result: Result | None = None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._stream)[1]
        except StopIteration:
            self.result = self._stream.results[0]
            raise


class _Batch:
    """The model-side state of one generate/stream call: its KV cache, padding mask and positions.

    Each call owns one, so streams of the same Engine can be interleaved (e.g. by a server).
    """

    def __init__(self, engine: "Engine", batch_size: int):
        self.model, self.engine, self.device = engine.model, engine, engine.device
        self.cache: KVCache | None = None
        if engine.use_cache:
            dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
            self.cache = KVCache(engine.config, batch_size, engine.window, self.device, dtype)
        self.mask: torch.Tensor | None = None  # (B, window) 1 = real token, when rows are padded
        self.next_pos = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)  # (B, 1)
        # The blocks for native decode steps, gathered once per call, not per token.
        self.native_blocks: native.DecodeBlocks | None = None
        blocks = engine.native_blocks() if engine.native and self.cache is not None else None
        if blocks is not None:
            cfg = engine.config
            self.native_blocks = native.DecodeBlocks(blocks, self.cache.k, self.cache.v, cfg.n_head,
                                                     cfg.layer_norm_epsilon)

    def next_logits(self, rows: list[_Row], active: list[int], still: list[int]) -> torch.Tensor:
        """Logits (B, V) for the next token of each row in `still` (a subset of `active`, in order)."""
        cache, window = self.cache, self.engine.window
        if cache is None or cache.length + 1 > cache.max_len:
            for i in still:
                row = rows[i]
                if len(row.tokens) - row.start > window:
                    row.start += self.engine.window_shift
            return self.prefill([rows[i] for i in still])
        if still != active:
            keep = torch.tensor([active.index(i) for i in still], device=self.device)
            with torch.inference_mode():
                cache.keep_rows(keep)
                self.next_pos = self.next_pos[keep]
                if self.mask is not None:
                    self.mask[: len(still)] = self.mask[keep]
        return self.decode_step([rows[i].tokens[-1] for i in still])

    @torch.inference_mode()
    def prefill(self, rows: list[_Row]) -> torch.Tensor:
        """Encode each row's context (left-padded to a batch); fills the cache. Returns (B, V)."""
        contexts = [r.tokens[r.start:] for r in rows]
        B, L = len(contexts), max(len(c) for c in contexts)
        if all(len(c) == L for c in contexts):
            idx, self.mask = torch.tensor(contexts, device=self.device), None
        else:
            idx = torch.zeros(B, L, dtype=torch.long, device=self.device)
            self.mask = torch.zeros(B, self.engine.window, dtype=torch.long, device=self.device)
            for b, c in enumerate(contexts):
                idx[b, L - len(c):] = torch.tensor(c)
                self.mask[b, L - len(c):] = 1
        if self.cache is not None:
            self.cache.reset()
        self.next_pos = torch.tensor([[len(c)] for c in contexts], device=self.device)
        mask = None if self.mask is None else self.mask[:, :L]
        fast = B * L <= native.MAX_ROWS and self.engine.native  # a short prefill's linears in the native kernel
        with native.decoding() if fast else contextlib.nullcontext():
            h = self.model.hidden_states(idx, mask, kv_cache=self.cache)
            return self.model.lm_head(h[:, -1])  # the head on the last position only: (B, V)

    @torch.inference_mode()
    def decode_step(self, last: list[int]) -> torch.Tensor:
        """One cached step: the rows' last tokens (B, 1) at their next positions. Returns (B, V)."""
        cache, B = self.cache, len(last)
        idx = torch.tensor(last, device=self.device).view(B, 1)
        mask = None
        if self.mask is not None:
            self.mask[:B, cache.length] = 1
            mask = self.mask[:B, : cache.length + 1]
        fast = B <= native.MAX_ROWS and self.engine.native  # linears in the native kernel
        with native.decoding() if fast else contextlib.nullcontext():
            if fast and self.native_blocks is not None:
                h = self._native_hidden(idx, mask, self.native_blocks)
            else:
                h = self.model.hidden_states(idx, mask, position_ids=self.next_pos, kv_cache=cache)[:, -1]
            logits = self.model.lm_head(h)
        self.next_pos += 1
        return logits

    def _native_hidden(self, idx: torch.Tensor, mask: torch.Tensor | None, blocks: native.DecodeBlocks) -> torch.Tensor:
        """GPT.hidden_states for the rows' last tokens idx (B, 1), their blocks in one native call. Returns (B, C)."""
        model, cache = self.model, self.cache
        x = model.transformer.wte(idx[:, 0]) + model.transformer.wpe(self.next_pos[:, 0])
        blocks(x, cache.length, mask)
        cache.advance(1)
        return model.transformer.ln_f(x)

    def close(self) -> None:
        """The call is over (the cache goes with this object)."""


class _SlotKV:
    """One layer's whole (B, H, max_len, D) cache buffers for static_decode_step: `update` writes
    the step's keys/values at slot (a 1-element tensor) and returns all max_len slots."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor):
        self.k, self.v, self.slot = k, v, slot

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, self.slot, k)
        self.v.index_copy_(2, self.slot, v)
        return self.k, self.v


def static_decode_step(model: GPT, idx: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, real: torch.Tensor,
                       ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
    """One decode step whose shapes do not depend on the position, for torch.compile: logits (B, V).

    idx, pos (B, 1): the rows' last tokens and their positions; slot (1,): the cache slot they are
    written to; real (B, max_len) bool: slots holding real tokens (False for left padding);
    ks, vs: each layer's (B, H, max_len, D) cache buffers, separate tensors, so that the compiled
    step writes one slot in place rather than copying a stacked cache. Every query attends over
    all max_len slots, masked to the real ones up to slot, and always to its own.
    """
    M = real.size(1)
    slots = torch.arange(M, device=real.device)
    keep = ((slots <= slot) & real) | (slots == slot)  # (B, M)
    mask = keep[:, None, None, :]  # (B, 1, 1, M): broadcast over heads and the one query
    tr = model.transformer
    x = tr.wte(idx) + tr.wpe(pos)  # (B, 1, C); dropout is off in eval mode
    for block, k, v in zip(tr.h, ks, vs):
        x = block(x, mask, _SlotKV(k, v, slot))
    return model.lm_head(tr.ln_f(x[:, -1]))


class _StaticBatch(_Batch):
    """A _Batch for Engine(compile=True): decode steps run the Engine's compiled static_decode_step.

    Its tensors keep their shapes and addresses (torch._dynamo.mark_static_address, for CUDA
    graphs) and the Engine reuses the object for later calls of the same batch size, so one
    compilation (one CUDA graph) serves every step of them. Rows that finish stay in the batch:
    they go on being decoded and their logits are dropped, because compacting the batch would
    change its shape. Prefill and the re-encode of a full window run eagerly, as in _Batch.
    """

    def __init__(self, engine: "Engine", batch_size: int):
        super().__init__(engine, batch_size)
        B, M, device = batch_size, engine.window, self.device
        self.idx = torch.zeros(B, 1, dtype=torch.long, device=device)  # (B, 1) each row's last token
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=device)  # (B, 1) its position
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the cache slot of this step
        self.real = torch.ones(B, M, dtype=torch.bool, device=device)  # (B, M) False = padding
        # The step reads every slot; masked ones get weight 0, but 0 * NaN from uninitialised memory is NaN.
        self.cache.k.zero_()
        self.cache.v.zero_()
        self.ks = [layer.k for layer in self.cache.layers]
        self.vs = [layer.v for layer in self.cache.layers]
        for t in (self.idx, self.pos, self.slot, self.real, *self.ks, *self.vs):
            torch._dynamo.mark_static_address(t)
        self.cache_row: dict[int, int] = {}  # id(_Row) -> its row in the cache, set by prefill

    def next_logits(self, rows: list[_Row], active: list[int], still: list[int]) -> torch.Tensor:
        if self.cache.length + 1 > self.cache.max_len:
            return super().next_logits(rows, active, still)  # slide the window: re-encode eagerly
        return self.static_step([rows[i] for i in still])

    @torch.inference_mode()
    def prefill(self, rows: list[_Row]) -> torch.Tensor:
        """_Batch.prefill into the first len(rows) cache rows. The other rows (finished ones, after a
        re-encode) are all padding to the compiled step: they attend to their own slot only."""
        logits = super().prefill(rows)
        n, L = len(rows), self.cache.length
        self.cache_row = {id(r): i for i, r in enumerate(rows)}
        self.real.fill_(True)
        if self.mask is not None:
            self.real[:n, :L] = self.mask[:, :L].bool()
        self.real[n:] = False
        self.pos.zero_()
        self.pos[:n] = self.next_pos
        return logits

    @torch.inference_mode()
    def static_step(self, rows: list[_Row]) -> torch.Tensor:
        """One compiled step for the whole batch; returns the logits (len(rows), V) of `rows`."""
        cache, B = self.cache, self.idx.size(0)
        at = [self.cache_row[id(r)] for r in rows]
        self.idx[at, 0] = torch.tensor([r.tokens[-1] for r in rows], device=self.device)
        self.slot.fill_(cache.length)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs have been used
        logits = self.engine.compiled_step(self.model, self.idx, self.pos, self.slot, self.real, self.ks, self.vs)
        cache.advance(1)
        self.pos += 1
        return logits if len(at) == B else logits[at]

    def close(self) -> None:
        """Give the batch back to the Engine for its next call with this many prompts."""
        self.engine.static_batches.setdefault(self.idx.size(0), []).append(self)


class _NativeLinear(nn.Linear):
    """nn.Linear whose one-row inference calls take simplegpt.native's matrix-vector kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.compile (Engine(compile=True) on a model an earlier Engine prepared) traces nn.Linear.
        if not torch.compiler.is_compiling() and native.usable(x, self.weight):
            return native.linear(x, self.weight, self.bias)
        return super().forward(x)


def use_native_linears(model: nn.Module) -> bool:
    """Route the one-row (batch-1 decode) calls of every nn.Linear through simplegpt.native, in place.

    The modules stay nn.Linear with the same weights; other calls (prefill, batches, autograd)
    run PyTorch's kernels as before. False where the kernel is unavailable (the model is left as
    it was) or the model has no layer for it (simplegpt.quantize's int8 layers take it by themselves).
    """
    if native.load() is None:
        return False
    found = False
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = _NativeLinear
        found = found or isinstance(module, _NativeLinear) or getattr(module, "qweight", None) is not None
    return found


def use_gemv_layout(model: nn.Module) -> None:
    """Store every Linear weight (and the tied output head) column-major, in place.

    Values, names and the state_dict are unchanged; only the memory layout differs. At batch 1
    each decode step is a matrix-vector product per layer, and on CPUs the BLAS kernel for
    x @ W with W stored (in, out) row by row streams memory faster than the one for the
    (out, in) layout (at GPT-2 124M on a 2-core CPU: blocks 11 -> 14 GB/s, head 11 -> 22 GB/s;
    docs/benchmarks.md). Training on such weights works as before.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            w = module.weight
            if w.dim() == 2 and w.is_contiguous() and w.size(0) > 1 and w.size(1) > 1:
                w.data = w.data.t().contiguous().t()


class Engine:
    """Generation with a model (and optionally its tokenizer, for text in and out).

    use_cache=False re-encodes the whole context for every token (the slow reference path).
    window_shift: tokens dropped from the front when a context fills the window
    (default n_positions // 4; 1 re-encodes the window every token once it is full).
    compile=True runs each decode step as one torch.compile'd static_decode_step (see _StaticBatch).
    """

    def __init__(self, model: GPT, tokenizer=None, *, use_cache: bool = True, window_shift: int | None = None,
                 device: str | torch.device | None = None, eos_id: int | None = None, gemv_layout: bool = True,
                 compile: bool = False):
        """Puts the model in eval mode. eos_id defaults to the tokenizer's; device to the model's.
        gemv_layout: on CPU, prepare the model for fast batch-1 decoding, in place and with the same
        values: simplegpt.native's kernels (use_native_linears), else weights re-stored column-major
        (use_gemv_layout). A trainer that samples mid-run passes False, so the rest of its run
        computes exactly as a run resumed from a checkpoint.
        compile: decode steps run one function compiled with torch.compile (CUDA graphs on CUDA)
        over a static cache, in place of the native kernels; the first steps of each batch size
        pay the compilation. Prefill and window re-encodes stay eager."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config: GPTConfig = model.config
        self.window = self.config.n_positions
        self.window_shift = window_shift or max(1, self.window // 4)
        if not 1 <= self.window_shift <= self.window:
            raise ValueError(f"window_shift must be in [1, {self.window}], got {window_shift}")
        self.use_cache = use_cache
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.eos_id: int | None = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", None)
        self.compile = compile
        if compile:
            _check_compilable(model, use_cache)
            # Dynamo compiles the step once per batch size (and model shape), on its first decode step.
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self.compiled_step = torch.compile(static_decode_step, fullgraph=True, dynamic=False, mode=mode)
            self.static_batches: dict[int, list[_StaticBatch]] = {}  # batch size -> free _StaticBatch objects
        self.native = not compile and gemv_layout and self.device.type == "cpu" and use_native_linears(model)
        if gemv_layout and self.device.type == "cpu" and not self.native:
            use_gemv_layout(model)

    def native_blocks(self) -> list[tuple[list[torch.Tensor | None], list[torch.Tensor] | None]] | None:
        """Each block's 12 tensors (and int8 row scales) for native.DecodeBlocks, or None where the
        model's blocks are not plain GPT-2 blocks on the CPU with fp32 or simplegpt.quantize int8
        linears, all of one kind (then decode steps go through the model's forward)."""
        blocks = []
        for block in self.model.transformer.h:
            if type(block) is not Block or type(block.attn) is not CausalSelfAttention or type(block.mlp) is not MLP:
                return None
            norms = (block.ln_1, block.ln_2)
            linears = (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
            if all(isinstance(m, _NativeLinear) for m in linears):
                weights, scales = [m.weight for m in linears], None
            elif all(getattr(m, "qweight", None) is not None for m in linears):
                weights, scales = [m.qweight for m in linears], [m.scale for m in linears]
            else:
                return None
            floats = [t for m in norms for t in (m.weight, m.bias)] + [m.bias for m in linears] + (scales or [])
            if scales is None:
                floats += weights
            if any(t is not None and not (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())
                   for t in floats):
                return None
            (ln1, ln2), (w1, w2, w3, w4) = norms, weights
            tensors = [ln1.weight, ln1.bias, w1, linears[0].bias, w2, linears[1].bias,
                       ln2.weight, ln2.bias, w3, linears[2].bias, w4, linears[3].bias]
            blocks.append((tensors, scales))
        if len({scales is None for _, scales in blocks}) > 1:
            return None
        return blocks

    @torch.inference_mode()
    def score(self, prompts: Sequence[str | Sequence[int]],
              top: int = 0) -> list[tuple[list[int], list[TokenLogprobs]]]:
        """Each prompt's token ids (cut from the left to the window, with a warning, as for generate)
        and the TokenLogprobs of every token after the first, given the tokens before it (teacher
        forcing), with `top` alternatives: the prompt's log-likelihood, token by token."""
        if not 0 <= top <= MAX_LOGPROBS:
            raise ValueError(f"top must be in [0, {MAX_LOGPROBS}], got {top}")
        out = []
        for prompt in prompts:
            ids = self._prompt_ids(prompt)
            logits, _ = self.model(torch.tensor([ids], device=self.device))  # (1, T, V)
            out.append((ids, token_logprobs(logits[0, :-1], torch.tensor(ids[1:], device=self.device), top)))
        return out

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None) -> list[Result]:
        """Generate for every prompt (text, or token ids) in one batch; one Result per prompt."""
        stream = self.stream_batch(prompts, params)
        for _ in stream:
            pass
        return stream.results

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> TextStream:
        """Text pieces of one completion as they are decoded; see TextStream.result afterwards."""
        return TextStream(self.stream_batch([prompt], params))

    def stream_batch(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None) -> Stream:
        """(row, text piece) events for a batch of prompts, in decoding order."""
        params = params or SamplingParams()
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of prompts; use stream()/generate([prompt]) for one")
        if not prompts:
            raise ValueError("give at least one prompt")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: create the Engine with one")
        seed = params.seed if params.seed is not None else random.randrange(2**62)
        rows = []
        for i, prompt in enumerate(prompts):
            ids = self._prompt_ids(prompt)
            gen = torch.Generator(device=self.device).manual_seed(seed + i)
            text = _TextAssembler(params.stop) if self.tokenizer is not None else None
            rows.append(_Row(len(ids), ids, gen, text, logprobs=None if params.logprobs is None else []))
        return Stream(self._decode(rows, params), rows)

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer: create the Engine with one, or pass token ids")
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            if self.eos_id is None:
                raise ValueError("the prompt is empty and the model has no EOS token to start from: give a prompt")
            ids = [self.eos_id]  # GPT-2 style: unconditional text starts after an end-of-text token
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} out of range 0..{self.config.vocab_size - 1}")
        if len(ids) > self.window:
            warnings.warn(f"prompt of {len(ids)} tokens is longer than the model's window of {self.window}: "
                          f"keeping its last {self.window} tokens", stacklevel=4)
            ids = ids[-self.window:]
        return ids

    def _decode(self, rows: list[_Row], params: SamplingParams) -> Iterator[tuple[int, str]]:
        """The decode loop shared by generate and stream: yields (row, piece) events."""
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(len(rows), self.config.vocab_size, dtype=torch.bool, device=self.device)
            for i, r in enumerate(rows):
                seen[i, r.tokens] = True
        batch = self._new_batch(len(rows))
        try:
            yield from self._decode_batch(rows, params, batch, seen)
        finally:
            batch.close()

    def _new_batch(self, batch_size: int) -> _Batch:
        """The model-side state of a call: a new _Batch, or with compile=True a free _StaticBatch of this size."""
        if not self.compile:
            return _Batch(self, batch_size)
        free = self.static_batches.get(batch_size)
        return free.pop() if free else _StaticBatch(self, batch_size)

    def _decode_batch(self, rows: list[_Row], params: SamplingParams, batch: _Batch,
                      seen: torch.Tensor | None) -> Iterator[tuple[int, str]]:
        """_decode's loop over one batch; seen (B, V) marks each row's context tokens, for the repetition penalty."""
        active = list(range(len(rows)))
        logits = batch.prefill(rows)
        stop_eos = params.stop_at_eos and self.eos_id is not None
        while True:
            row_seen = seen[active] if seen is not None else None
            # torch on one thread beside the native kernel's spinning workers (see native.decoding)
            with torch.inference_mode(), native.decoding() if self.native else contextlib.nullcontext():
                drawn = sample_next_token(logits, params, [rows[i].generator for i in active], row_seen)
                lps = None if params.logprobs is None else token_logprobs(logits, drawn, params.logprobs)
                nxt = drawn.tolist()
            still = []
            for j, (i, tok) in enumerate(zip(active, nxt)):
                row = rows[i]
                if stop_eos and tok == self.eos_id:
                    row.finish_reason, row.stop_reason = FINISH_STOP, tok
                else:
                    row.generated.append(tok)
                    row.tokens.append(tok)
                    if lps is not None:
                        row.logprobs.append(lps[j])
                    if seen is not None:
                        seen[i, tok] = True
                    if row.text is not None:
                        piece = row.text.feed(self.tokenizer.decode_bytes([tok]))
                        if piece:
                            yield i, piece
                        if row.text.matched is not None:
                            row.finish_reason, row.stop_reason = FINISH_STOP, row.text.matched
                    if row.finish_reason is None and len(row.generated) >= params.max_new_tokens:
                        row.finish_reason = FINISH_LENGTH
                if row.finish_reason is None:
                    still.append(i)
                elif row.text is not None and row.text.matched is None:
                    piece = row.text.feed(b"", final=True)
                    if piece:
                        yield i, piece
            if not still:
                return
            logits = batch.next_logits(rows, active, still)
            active = still


def _check_compilable(model: GPT, use_cache: bool) -> None:
    """ValueError for an Engine(compile=True) that cannot run the compiled static-cache step."""
    if not use_cache:
        raise ValueError("compile=True needs the KV cache: drop use_cache=False (the uncached path is the reference)")
    from .quantize import Int8Linear

    if any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ValueError("compile=True does not support int8-quantized models (their fbgemm kernels do not "
                         "compile): use one or the other")


@torch.no_grad()
def generate_ids(model: GPT, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None,
                 device: str | torch.device = "cpu", params: SamplingParams | None = None) -> list[int]:
    """New token ids after prompt_ids, greedy unless params say otherwise; ends with eos_id if it was hit.

    Uses the cached engine; the context slides past n_positions (see Engine.window_shift).
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    params = dataclasses.replace(params or SamplingParams(temperature=0.0), max_new_tokens=max_new_tokens)
    [result] = Engine(model, device=device, eos_id=eos_id).generate([prompt_ids], params)
    return result.token_ids + ([eos_id] if result.stop_reason == eos_id and eos_id is not None else [])
