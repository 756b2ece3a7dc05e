"""POST /v1/completions: text completion of one or more prompts (text or token ids), n each,
streamed or not, with logprobs and echo; max_tokens 0 with echo scores a prompt without generating."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from ...generation.sampling import TokenLogprobs
from ...generation.text import FINISH_LENGTH, Result
from ..errors import APIError
from ..params import Prompt, logprobs_count, prompt_list, refuse_unsupported, sampling_params
from ..responses import Offsets, choice_logprobs, completion_logprobs, sse, usage
from ..running import finished, scored, streamed, timing_first_token
from ..scheduler import Submission
from ..schemas import CompletionRequest
from ..state import ServerState, State

router = APIRouter()

Scores = list[tuple[list[int], list[TokenLogprobs]]]  # per row: its prompt's ids and their logprobs


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, state: State):
    state.check_model(req.model)
    refuse_unsupported(req, {"best_of": req.best_of not in (None, 1), "suffix": bool(req.suffix)})
    k = logprobs_count(req.logprobs, 5, "logprobs")
    max_new = req.max_tokens if req.max_tokens is not None else 16
    score_only = req.echo and max_new == 0  # the prompt scored (with logprobs), nothing generated
    if score_only and req.stream:
        raise APIError("max_tokens 0 with echo (scoring the prompt) is not streamed", param="max_tokens")
    params = sampling_params(req, 1 if score_only else max_new, [], state.limits.max_tokens, k)
    rows = state.check_rows([p for p in prompt_list(req.prompt) for _ in range(req.n)])
    ids = state.token_rows(rows, req.truncate_prompt_tokens)
    echoes = echo_texts(state, req, rows, ids)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}
    tokenizer = state.tokenizer

    deadline = state.scheduler.deadline()  # scoring the prompt and generating share the request's time
    scores = None
    if score_only or (req.echo and k is not None):  # echo with logprobs: the prompt's tokens come first
        scores = await scored(state, ids, k or 0, request, deadline)
        if isinstance(scores, Response):
            return scores
    if score_only:
        results = [Result("", [], FINISH_LENGTH, prompt_tokens=len(t)) for t, _ in scores]
        state.count(results, req.n)
        choices = [choice(i, echoes[i], FINISH_LENGTH,
                          choice_logprobs(tokenizer, echoes[i], None, scores[i] if k is not None else None))
                   for i in range(len(rows))]
        return {**head, "choices": choices, "usage": usage(results, req.n)}

    sub = timing_first_token(state, state.scheduler.submit(ids, params, req.stream, deadline))
    if req.stream:
        return stream(state, req, sub, head, echoes, scores, k)
    results = await finished(state, sub, request)
    if isinstance(results, Response):
        return results
    state.count(results, req.n)
    choices = [choice(i, echoes[i] + r.text, r.finish_reason,
                      choice_logprobs(tokenizer, echoes[i], r, scores[i] if scores else None))
               for i, r in enumerate(results)]
    return {**head, "choices": choices, "usage": usage(results, req.n)}


def choice(i: int, text: str, finish: str | None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}


def echo_texts(state: ServerState, req: CompletionRequest, rows: list[Prompt], ids: list[list[int]]) -> list[str]:
    """Each row's echo: its prompt as text (token-id prompts and cut prompts as their tokens decode),
    or "" without echo."""
    if not req.echo:
        return [""] * len(rows)
    return [p if isinstance(p, str) and req.truncate_prompt_tokens is None else state.tokenizer.decode(t)
            for p, t in zip(rows, ids)]


def stream(state: ServerState, req: CompletionRequest, sub: Submission, head: dict[str, Any], echoes: list[str],
           scores: Scores | None, k: int | None) -> StreamingResponse:
    """The completion's events: the echoes first (with echo), then each row's pieces with the logprobs
    of the tokens they complete, then each row's finish reason."""
    tokenizer, n = state.tokenizer, len(echoes)
    sent = [0] * n  # each row's tokens whose logprobs went out
    shown = [len(e) for e in echoes]  # each row's characters sent
    offsets = [Offsets(tokenizer, shown[i]) for i in range(n)]

    def new_logprobs(i: int, upto: int, piece: str, last: Result | None = None) -> dict[str, Any] | None:
        """The logprobs of row i's tokens sent[i]..upto, which this piece of text completes; the
        last ones (the row's Result given) point no further than the text's end, and end with the
        end-of-text token's when it ended the row."""
        shown[i] += len(piece)
        if k is None:
            return None
        lps = sub.ticket.rows[i].logprobs[sent[i]:upto]
        sent[i] = upto
        if last is not None and last.eos_logprob is not None:
            lps = [*lps, last.eos_logprob]
        return completion_logprobs(tokenizer, lps, offsets[i]([t.token_id for t in lps],
                                                              shown[i] if last is not None else None))

    def echo_events() -> Iterator[str]:
        for i in range(n if req.echo else 0):
            lp = choice_logprobs(tokenizer, echoes[i], None, scores[i]) if scores else None
            yield sse({**head, "choices": [choice(i, echoes[i], None, lp)]})

    return streamed(
        state, sub, req.n, req.wants_usage, head, echo_events(),
        lambda i, piece, upto: sse({**head, "choices": [choice(i, piece, None, new_logprobs(i, upto, piece))]}),
        lambda i, r: sse({**head, "choices": [choice(i, "", r.finish_reason,
                                                     new_logprobs(i, len(r.token_ids), "", r))]}))
