"""POST /v1/chat/completions: chat over the model through a template (serve.chat), n replies,
streamed or not, with logprobs."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from ..chat import DEFAULT_CHAT_MAX_TOKENS, chat_input
from ..errors import APIError
from ..params import logprobs_count, refuse_unsupported, sampling_params
from ..responses import ChatTokens, chat_logprobs, reply_logprobs, sse, usage
from ..running import finished, streamed, timing_first_token
from ..scheduler import Submission
from ..schemas import ChatRequest
from ..state import ServerState, State

router = APIRouter()


def chat_text(state: ServerState, req: ChatRequest) -> tuple[str | list[int], list[str]]:
    """The prompt the model continues for the request's messages (the checkpoint's chat template, or the
    plain one), and the stop strings that end its reply."""
    return chat_input(state.tokenizer, req.messages)


@router.post("/v1/chat/completions")
async def chat(req: ChatRequest, request: Request, state: State):
    state.check_model(req.model)
    refuse_unsupported(req, {"tools": bool(req.tools), "tool_choice": req.tool_choice not in (None, "none"),
                             "response_format": (req.response_format or {}).get("type", "text") != "text"})
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
    k = logprobs_count(req.top_logprobs or 0, 20, "top_logprobs") if req.logprobs else None
    max_tokens = state.limits.max_tokens
    prompt, stop = chat_text(state, req)
    params = sampling_params(req, limit if limit is not None else min(DEFAULT_CHAT_MAX_TOKENS, max_tokens), stop,
                             max_tokens, k)
    rows = state.check_rows([prompt] * req.n)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}

    sub = timing_first_token(state, state.scheduler.submit(state.token_rows(rows, req.truncate_prompt_tokens,
                                                                             "messages"), params, req.stream))
    if req.stream:
        return stream(state, req, sub, {**head, "object": "chat.completion.chunk"}, k)
    results = await finished(state, sub, request)
    if isinstance(results, Response):
        return results
    state.count(results, req.n)
    tokenizer = state.tokenizer
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text.lstrip()},
                "logprobs": chat_logprobs(tokenizer, reply_logprobs(tokenizer, r)), "finish_reason": r.finish_reason}
               for i, r in enumerate(results)]
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage(results, req.n)}


def stream(state: ServerState, req: ChatRequest, sub: Submission, chunk: dict[str, Any],
           k: int | None) -> StreamingResponse:
    """The reply's chunks: the assistant's role first, then each row's pieces (without the reply's
    leading whitespace, as not streamed) with the logprobs of the tokens they show, then each row's
    finish reason."""
    tokenizer, n = state.tokenizer, req.n
    reporting = [ChatTokens(tokenizer) for _ in range(n)]  # which tokens' logprobs go out, as non-streamed
    started = [False] * n

    def delta(i: int, d: dict[str, str], finish: str | None = None, piece: str | None = None,
              upto: int = 0) -> str:
        lp = None
        if k is not None and piece is not None:  # the row's first `upto` tokens released `piece`
            row = sub.ticket.rows[i]
            lp = chat_logprobs(tokenizer, [row.logprobs[t] for t in
                                           reporting[i].release(row.generated[:upto], piece, finish is not None)])
        return sse({**chunk, "choices": [{"index": i, "delta": d, "logprobs": lp, "finish_reason": finish}]})

    def piece_event(i: int, piece: str, upto: int) -> str | None:
        shown = piece
        if not started[i]:  # the reply without the space after 'Assistant:', as non-streamed
            shown = piece.lstrip()
            started[i] = bool(shown)
        if not shown:
            if k is not None:  # its tokens are decided with the next piece
                reporting[i].release(sub.ticket.rows[i].generated[:upto], piece)
            return None
        return delta(i, {"content": shown}, piece=piece, upto=upto)

    return streamed(state, sub, req.n, req.wants_usage, chunk,
                    (delta(i, {"role": "assistant", "content": ""}) for i in range(n)), piece_event,
                    lambda i, r: delta(i, {}, r.finish_reason, "", len(r.token_ids)))
