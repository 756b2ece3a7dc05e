"""A request's fields checked and turned into what the engine takes: SamplingParams and prompts.
Every check that fails is an APIError (400) naming the field."""

from __future__ import annotations

from ..generation.sampling import SamplingParams, check_seed
from .errors import APIError
from .schemas import SamplingRequest

Prompt = str | list[int]  # text, or token ids


def refuse_unsupported(req: SamplingRequest, extra: dict[str, bool]) -> None:
    """A 400 for the first of OpenAI's options simplegpt has no equivalent for that the request
    uses; extra: the endpoint's own such options, name -> used."""
    unsupported = {"presence_penalty": req.presence_penalty != 0, "frequency_penalty": req.frequency_penalty != 0,
                   "logit_bias": bool(req.logit_bias), **extra}
    for name, used in unsupported.items():
        if used:
            hint = " (simplegpt's repetition_penalty is the nearest option)" if name.endswith("_penalty") else ""
            raise APIError(f"{name} is not supported by simplegpt{hint}", param=name)


def logprobs_count(k: int | None, most: int, param: str) -> int | None:
    """The number of alternatives to report (None = no logprobs), checked against 0..most."""
    if k is None:
        return None
    if not 0 <= k <= most:
        raise APIError(f"{param} must be between 0 and {most}, got {k}", param=param)
    return k


MAX_STOP_CHARS = 256  # per stop string: held-back text and the matching cost grow with it


def encode(tokenizer, text: str, param: str = "prompt") -> list[int]:
    """text as token ids; a character the tokenizer has no token for (a character-level vocabulary) is a
    400 naming it."""
    try:
        return list(tokenizer.encode(text))
    except ValueError as e:
        raise APIError(str(e), param=param) from None


def prompt_tokens(tokenizer, prompt: Prompt, window: int, truncate: int | None, param: str = "prompt") -> list[int]:
    """A prompt as token ids, checked against the model's context: longer than `window` tokens is
    a 400 that says the limit, unless truncate (the request's truncate_prompt_tokens) asks to keep
    its last tokens (at most window of them)."""
    ids = encode(tokenizer, prompt, param) if isinstance(prompt, str) else list(prompt)
    if truncate is not None:
        if truncate < 1:
            raise APIError(f"truncate_prompt_tokens must be a positive integer, got {truncate}",
                           param="truncate_prompt_tokens")
        return ids[-min(truncate, window):]
    if len(ids) > window:
        what = "the messages have" if param == "messages" else f"the {param} has"  # as the request named them
        raise APIError(f"{what} {len(ids)} tokens; this model's context is {window} tokens: shorten "
                       f"{'them' if param == 'messages' else 'it'}, or send truncate_prompt_tokens to keep the "
                       "last tokens", param=param, code="context_length_exceeded")
    return ids


def sampling_params(req: SamplingRequest, max_tokens: int, stop: list[str], limit: int,
                    logprobs: int | None = None) -> SamplingParams:
    """The engine's SamplingParams for a request: OpenAI's ranges (temperature 0-2, n 1-16, up to 4
    stop strings), max_tokens up to the server's limit, stop: the endpoint's own stop strings;
    stream_options only with stream: true."""
    if req.stream_options is not None and not req.stream:  # as OpenAI documents it and vLLM refuses it
        raise APIError("stream_options is only allowed with stream: true", param="stream_options")
    if not 0 <= req.temperature <= 2:
        raise APIError(f"temperature must be between 0 and 2, got {req.temperature}", param="temperature")
    if not 1 <= req.n <= 16:
        raise APIError(f"n must be between 1 and 16, got {req.n}", param="n")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise APIError("stop takes at most 4 strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(f"each stop string may have at most {MAX_STOP_CHARS} characters", param="stop")
    if not 0 < max_tokens <= limit:
        raise APIError(f"max_tokens must be between 1 and {limit} (the server's --max-tokens), got {max_tokens}",
                       param="max_tokens")
    try:
        check_seed(req.seed)  # any 64-bit seed; a row's seed + i wraps modulo 2^64
    except ValueError as e:
        raise APIError(str(e), param="seed") from None
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                              top_p=req.top_p, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                              seed=req.seed, stop=[s for s in stops + stop if s], stop_at_eos=not req.ignore_eos,
                              logprobs=logprobs)
    except ValueError as e:  # SamplingParams checks the rest and names the field
        field = str(e).split(" ", 1)[0]
        raise APIError(str(e), param=field if field in SamplingParams.__dataclass_fields__ else None) from None


def prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    """A completion request's prompt (a string, a list of strings, token ids, or lists of them) as a
    list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)
