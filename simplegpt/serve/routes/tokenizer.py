"""vLLM's tokenizer routes (/tokenizer_info, /tokenize, /detokenize), through which
lm-evaluation-harness's API clients (local-completions) tokenize a task's text as the server does:
any simplegpt tokenizer works, with nothing to download."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ...tokenizer import EOS_TEXT
from ..errors import APIError
from ..params import encode
from ..schemas import DetokenizeRequest, TokenizeRequest
from ..state import State

router = APIRouter()


@router.get("/tokenizer_info")
def tokenizer_info(state: State) -> dict[str, Any]:
    tokenizer = state.tokenizer
    return {"tokenizer_class": f"simplegpt-{tokenizer.kind}", "eos_token": EOS_TEXT, "bos_token": None,
            "pad_token": None, "model_max_length": state.window, "vocab_size": tokenizer.vocab_size}


@router.post("/tokenize")
def tokenize(req: TokenizeRequest, state: State) -> dict[str, Any]:
    if req.model is not None:
        state.check_model(req.model)
    tokenizer = state.tokenizer
    # the end-of-text token's name is that token here, as in Hugging Face's tokenizers (and vLLM's
    # /tokenize); a completion's text prompt stays plain text
    ids: list[int] = []
    for i, part in enumerate(req.prompt.split(EOS_TEXT)):
        ids += ([tokenizer.eos_id] if i else []) + (encode(tokenizer, part) if part else [])
    return {"tokens": ids, "count": len(ids), "max_model_len": state.window}


@router.post("/detokenize")
def detokenize(req: DetokenizeRequest, state: State) -> dict[str, str]:
    if req.model is not None:
        state.check_model(req.model)
    tokenizer = state.tokenizer
    bad = next((t for t in req.tokens if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        raise APIError(f"token id {bad} is outside the vocabulary (0..{tokenizer.vocab_size - 1})", param="tokens")
    # the end-of-text token reads as its name, as /tokenize takes it (every tokenizer alike: the char and
    # byte tokenizers' decode drops it)
    parts: list[list[int]] = [[]]
    for t in req.tokens:
        if t == tokenizer.eos_id:
            parts.append([])
        else:
            parts[-1].append(t)
    return {"prompt": EOS_TEXT.join(tokenizer.decode(part) for part in parts)}
