"""The response bodies' parts in OpenAI's shapes: usage, server-sent events, logprobs, the model card."""

from __future__ import annotations

import json
from typing import Any

from ..engine import Engine, Result, TokenLogprobs
from ..tokenizer import Tokenizer


def usage(results: list[Result], n: int) -> dict[str, int]:
    """Token counts of a request whose rows are each prompt n times: its prompts counted once each."""
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event: a JSON object, or a plain string such as [DONE]."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def token_text(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token as text (bytes that are not whole UTF-8 characters as \\x escapes) and as bytes."""
    raw = tokenizer.decode_bytes([token_id])
    return raw.decode("utf-8", errors="backslashreplace"), list(raw)


def completion_logprobs(tokenizer: Tokenizer, result: Result | None,
                        scored: tuple[list[int], list[TokenLogprobs]] | None) -> dict[str, Any] | None:
    """The completions API's logprobs: tokens, their log-probabilities, the alternatives, text
    offsets; with `scored` (echo) the prompt's tokens first, the very first without any (null)."""
    if scored is None and (result is None or result.logprobs is None):
        return None
    entries: list[TokenLogprobs | int] = []
    if scored is not None:
        ids, lps = scored
        entries = [ids[0], *lps]
    if result is not None and result.logprobs:
        entries += result.logprobs
    tokens = [token_text(tokenizer, e if isinstance(e, int) else e.token_id)[0] for e in entries]
    return {"tokens": tokens,
            "token_logprobs": [None if isinstance(e, int) else e.logprob for e in entries],
            "top_logprobs": [None if isinstance(e, int) else {token_text(tokenizer, i)[0]: v for i, v in e.top}
                             for e in entries],
            "text_offset": [sum(len(x) for x in tokens[:i]) for i in range(len(tokens))]}


def chat_logprobs(tokenizer: Tokenizer, result: Result) -> dict[str, Any] | None:
    """The chat API's logprobs: one entry per token with its bytes and the alternatives."""
    if result.logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                        for t in result.logprobs]}


def model_card(engine: Engine, name: str, created: int) -> dict[str, Any]:
    """An entry of /v1/models: OpenAI's fields, and the model's context length and parameter count."""
    return {"id": name, "object": "model", "created": created, "owned_by": "simplegpt",
            "context_length": engine.config.n_positions, "parameters": engine.model.num_parameters()}
