"""The Engine: generation with a model, batched, streamed, with one decode loop for every backend.

    engine = Engine(model, tokenizer)
    [result] = engine.generate(["Once upon a time"], SamplingParams(max_new_tokens=50, temperature=0.8))
    for piece in engine.stream("Once upon a time", SamplingParams(temperature=0)):
        print(piece, end="", flush=True)

Batches of prompts are left-padded; each row has its own attention mask, positions and random
generator, so a prompt gives the same output in a batch as alone. When a row's context reaches
the model's window (n_positions) its oldest `window_shift` tokens are dropped and the rest are
re-encoded once (positions restart at 0, as in training), so generation never stops for length.

The Engine never changes a model it was handed (classes, parameters, layout, training flag):
its backend (picked once, at construction; see backend.py) runs its own view of the model, over
the same parameters, in eval mode. Engine.from_checkpoint loads a model the engine owns and may
prepare it in place.
"""

from __future__ import annotations

import dataclasses
import os
import random
import warnings
from typing import Iterator, Sequence

import torch

from ..accel import cpu
from ..model import GPT, GPTConfig
from .backend import Backend, model_view
from .compiled import CompiledBackend, check_compilable
from .native import NativeBackend, native_view
from .sampling import (MAX_LOGPROBS, SamplingParams, TokenLogprobs, sample_next_token, seeded_generator,
                       token_logprobs)
from .text import Result, Row, Stream, TextAssembler, TextStream


def pick_backend(model: GPT, device: torch.device, window_shift: int, use_cache: bool, compile: bool) -> Backend:
    """The backend an Engine runs: compiled if asked, else the native CPU kernels where they are
    enabled now (simplegpt.accel.cpu.enabled()) for a cached engine on the CPU with a layer they
    take, else eager. Raises ValueError for compile=True without the cache or with int8 layers."""
    window = model.config.n_positions
    if compile:
        check_compilable(model, use_cache)
        return CompiledBackend(model_view(model), device, window, window_shift)
    if use_cache and device.type == "cpu" and cpu.enabled():
        view = native_view(model)
        if view is not None:
            return NativeBackend(view, device, window, window_shift)
    return Backend(model_view(model), device, window, window_shift, use_cache)


class Engine:
    """Generation with a model (and optionally its tokenizer, for text in and out).

    The model is left as it was: the engine runs its own view of it (the same Parameter objects,
    so later in-place updates such as optimizer steps are seen; eval mode, so no dropout, whatever
    the caller's model's mode). `backend.name` says which backend runs it: "native" (the CPU
    kernels), "compiled" or "eager".
    """

    def __init__(self, model: GPT, tokenizer=None, *, use_cache: bool = True, window_shift: int | None = None,
                 device: str | torch.device | None = None, eos_id: int | None = None, compile: bool = False):
        """eos_id defaults to the tokenizer's; device to the model's.
        use_cache=False re-encodes the whole context for every token (the slow reference path,
        in PyTorch's kernels). window_shift: tokens dropped from the front when a context fills the
        window (default n_positions // 4; 1 re-encodes the window every token once it is full).
        compile: decode steps run one function compiled with torch.compile (CUDA graphs on CUDA)
        over a static cache, in place of the native kernels; the first steps of each batch size pay
        the compilation. ValueError with use_cache=False or an int8-quantized model.
        On the CPU, the native kernels are used when simplegpt.accel.cpu.enabled() at construction
        (`with simplegpt.accel.cpu.disabled(): Engine(model)` gives the eager backend)."""
        self.model = model
        self.tokenizer = tokenizer
        self.config: GPTConfig = model.config
        self.window = self.config.n_positions
        self.window_shift = window_shift or max(1, self.window // 4)
        if not 1 <= self.window_shift <= self.window:
            raise ValueError(f"window_shift must be in [1, {self.window}], got {window_shift}")
        self.use_cache = use_cache
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.eos_id: int | None = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", None)
        # Ids the engine may draw: an imported model's embedding is often padded past its tokenizer's
        # tokens (Qwen3: 151936 rows, 151669 tokens), and an id with no token has no text.
        self.vocab = min(self.config.vocab_size, getattr(tokenizer, "vocab_size", self.config.vocab_size))
        self.backend = pick_backend(model, self.device, self.window_shift, use_cache, compile)
        self.quant_report = None  # set by from_checkpoint(quantize="int8")

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, tokenizer=None, *, device: str | torch.device | None = None,
                        quantize: str | None = None, compile: bool = False) -> "Engine":
        """An Engine over a checkpoint directory that it loads (simplegpt.checkpoint.load_checkpoint)
        and owns, prepared in place for decoding.

        tokenizer: defaults to the checkpoint's (None if it has none: token-id prompts only).
        device: None or "auto" picks cuda, mps, then cpu (cpu with quantize="int8").
        quantize: None/"none", or "int8" (simplegpt.quantize.quantize_int8, CPU only; the
        engine's `quant_report` then holds its sizes). compile: as for Engine.
        On the CPU without the native kernels, the weights are re-stored column-major
        (use_gemv_layout), which PyTorch's matrix-vector kernel streams faster.
        Raises CheckpointError for a missing or bad checkpoint, ValueError for a bad device,
        an unknown quantize mode, or compile=True with int8 (after loading: check that first).
        """
        from ..checkpoint import load_checkpoint
        from ..devices import resolve_device
        from ..quantize import QUANT_MODES, quantize_int8
        from .layout import use_gemv_layout

        quantize = quantize or "none"
        if quantize not in QUANT_MODES:
            raise ValueError(f"quantize must be one of {list(QUANT_MODES)}, got {quantize!r}")
        device = device or "auto"
        device = torch.device("cpu") if device == "auto" and quantize == "int8" else resolve_device(device)
        ck = load_checkpoint(path, device=device)
        report = quantize_int8(ck.model) if quantize == "int8" else None
        if device.type == "cpu" and report is None and not compile and not cpu.enabled():
            use_gemv_layout(ck.model)
        engine = cls(ck.model, tokenizer if tokenizer is not None else ck.tokenizer, device=device, compile=compile)
        engine.quant_report = report
        return engine

    @torch.inference_mode()
    def score(self, prompts: Sequence[str | Sequence[int]],
              top: int = 0) -> list[tuple[list[int], list[TokenLogprobs]]]:
        """Each prompt's token ids (cut from the left to the window, with a warning, as for generate)
        and the TokenLogprobs of every token after the first, given the tokens before it (teacher
        forcing), with `top` alternatives among the ids with a token (Engine.vocab): the prompt's
        log-likelihood, token by token, normalised as generate's over the ids with a token (over all
        of the model's where the prompt holds an id past them)."""
        if not 0 <= top <= MAX_LOGPROBS:
            raise ValueError(f"top must be in [0, {MAX_LOGPROBS}], got {top}")
        out = []
        for prompt in prompts:
            ids = self._prompt_ids(prompt)
            logits, _ = self.backend.model(torch.tensor([ids], device=self.device))  # (1, T, V)
            logits = logits[0, :-1]
            if max(ids[1:], default=0) < self.vocab:  # as generate: over the ids with a token
                logits = logits[:, :self.vocab]
            out.append((ids, token_logprobs(logits, torch.tensor(ids[1:], device=self.device), top, self.vocab)))
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
            gen = seeded_generator(seed + i, self.device)  # all 64 bits of seed + i (modulo 2^64)
            text = TextAssembler(params.stop) if self.tokenizer is not None else None
            rows.append(Row(len(ids), ids, gen, text, logprobs=None if params.logprobs is None else []))
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

    def _decode(self, rows: list[Row], params: SamplingParams) -> Iterator[tuple[int, str]]:
        """The decode loop shared by generate and stream, for every backend: yields (row, piece) events."""
        seen = None  # (B, V) each row's context tokens, for the repetition penalty
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(len(rows), self.vocab, dtype=torch.bool, device=self.device)
            for i, r in enumerate(rows):
                seen[i, [t for t in r.tokens if t < self.vocab]] = True  # a prompt may hold ids past the tokens
        batch = self.backend.new_batch(len(rows))
        try:
            active = list(range(len(rows)))
            logits = batch.prefill(rows)
            eos_id = self.eos_id if params.stop_at_eos else None
            decode_bytes = self.tokenizer.decode_bytes if self.tokenizer is not None else None
            while True:
                row_seen = seen[active] if seen is not None else None
                if self.vocab < logits.size(-1):
                    logits = logits[:, :self.vocab]  # (B, V) -> (B, tokens)
                with torch.inference_mode(), self.backend.sampling():
                    drawn = sample_next_token(logits, params, [rows[i].generator for i in active], row_seen)
                    lps = None if params.logprobs is None else token_logprobs(logits, drawn, params.logprobs)
                    nxt = drawn.tolist()
                still = []
                for j, (i, tok) in enumerate(zip(active, nxt)):
                    row = rows[i]
                    for piece in row.accept(tok, None if lps is None else lps[j], eos_id, params.max_new_tokens,
                                            decode_bytes):
                        yield i, piece
                    if row.finish_reason is None:
                        still.append(i)
                        if seen is not None:
                            seen[i, tok] = True
                if not still:
                    return
                logits = batch.next_logits(rows, active, still)
                active = still
        finally:
            batch.close()


@torch.no_grad()
def generate_ids(model: GPT, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None,
                 device: str | torch.device = "cpu", params: SamplingParams | None = None) -> list[int]:
    """New token ids after prompt_ids, greedy unless params say otherwise; ends with eos_id if it was hit.

    Uses the cached engine (the model is left as it was); the context slides past n_positions
    (see Engine.window_shift). ValueError for an empty prompt.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    params = dataclasses.replace(params or SamplingParams(temperature=0.0), max_new_tokens=max_new_tokens)
    [result] = Engine(model, device=device, eos_id=eos_id).generate([prompt_ids], params)
    return result.token_ids + ([eos_id] if result.stop_reason == eos_id and eos_id is not None else [])
