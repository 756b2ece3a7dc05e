"""The response bodies' parts in OpenAI's shapes: usage, server-sent events, logprobs, the model card."""

from __future__ import annotations

import codecs
import json
from typing import Any

from ..generation.engine import Engine
from ..generation.sampling import TokenLogprobs
from ..generation.text import Result
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


class Offsets:
    """Where each token starts in the text its bytes decode to, token after token: the index (plus
    start) of the character its first byte belongs to, counted as the text is decoded (UTF-8,
    incrementally, bad bytes replaced), so a character split across tokens gives them all its index."""

    def __init__(self, tokenizer: Tokenizer, start: int = 0):
        self.tokenizer, self.chars = tokenizer, start
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, ids: list[int], limit: int | None = None) -> list[int]:
        """The next tokens' offsets, none past limit: tokens the text does not show (a stop string,
        the EOS of an empty prompt) point at its end."""
        out = []
        for t in ids:
            raw = self.tokenizer.decode_bytes([t])
            head = self.decoder.decode(raw[:1])  # may flush replacement characters for bytes held before
            held = bool(self.decoder.getstate()[0])  # the first byte starts (or continues) a character not yet whole
            at = self.chars + len(head) - (0 if held or not raw else 1)
            out.append(at if limit is None else min(at, limit))
            self.chars += len(head) + len(self.decoder.decode(raw[1:]))
        return out


def text_offsets(tokenizer: Tokenizer, ids: list[int], text_len: int, start: int = 0) -> list[int]:
    """Offsets (see Offsets) of ids in a text of text_len characters that starts at `start`."""
    return Offsets(tokenizer, start)(ids, start + text_len)


def completion_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprobs | int], offsets: list[int]) -> dict[str, Any]:
    """The completions API's logprobs for `entries` (a bare token id: one without a log-probability,
    the prompt's first) at text offsets `offsets`: tokens, their log-probabilities, the alternatives."""
    tokens = [token_text(tokenizer, e if isinstance(e, int) else e.token_id)[0] for e in entries]
    return {"tokens": tokens,
            "token_logprobs": [None if isinstance(e, int) else e.logprob for e in entries],
            "top_logprobs": [None if isinstance(e, int) else {token_text(tokenizer, i)[0]: v for i, v in e.top}
                             for e in entries],
            "text_offset": offsets}


def choice_logprobs(tokenizer: Tokenizer, echo: str, result: Result | None,
                    scored: tuple[list[int], list[TokenLogprobs]] | None) -> dict[str, Any] | None:
    """A completion choice's logprobs, whose text is echo + result.text: with `scored` (echo) the
    prompt's tokens first, the very first without any (null), then the generated ones, and last the
    end-of-text token when it ended the row (its text is not shown: it points at the text's end; a
    scoring client that asks for one token reads that token's logprob, whatever it is)."""
    if scored is None and (result is None or result.logprobs is None):
        return None
    entries: list[TokenLogprobs | int] = []
    offsets: list[int] = []
    if scored is not None:
        ids, lps = scored
        entries = [ids[0], *lps]
        offsets = text_offsets(tokenizer, ids, len(echo))
    if result is not None and result.logprobs:
        entries += result.logprobs
        offsets += text_offsets(tokenizer, [t.token_id for t in result.logprobs], len(result.text), len(echo))
    if result is not None and result.eos_logprob is not None:
        entries.append(result.eos_logprob)
        offsets.append(len(echo) + len(result.text))
    return completion_logprobs(tokenizer, entries, offsets)


class ChatTokens:
    """Which tokens of a chat reply its logprobs report: those whose text shows in message.content,
    the reply with its leading whitespace removed and without a matched stop string. A token whose
    characters meet that content is reported whole (' Hello' whose space is removed, 'x\\n' where the
    stop '\\nUser:' begins), so the reported tokens' bytes, joined, are the content with at most the
    removed whitespace before it and the start of the stop string after it; tokens that fall wholly
    in either are left out.

    Fed a row's tokens as its reply's text is released piece by piece (streamed), it hands out the
    same tokens, in order, as fed the whole reply at once.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.offsets = Offsets(tokenizer)
        self.spans: list[tuple[int, int]] = []  # per token: the characters [first, end) its bytes touch
        self.sent = 0  # tokens decided (reported or left out)
        self.shown = 0  # characters of the reply released
        self.lead = 0  # leading whitespace characters (all released ones until the content starts)
        self.started = False  # a character of the content was released

    def release(self, ids: list[int], piece: str, final: bool = False) -> list[int]:
        """The reply's tokens so far (ids) once `piece` of its text (before any removal) is released;
        final: the reply is whole. Returns the indices in ids of the tokens to report now."""
        for t in ids[len(self.spans):]:
            [first] = self.offsets([t])
            self.spans.append((first, max(self.offsets.chars, first + 1)))  # a partial character is touched
        if not self.started:
            self.lead += len(piece) - len(piece.lstrip())
            self.started = bool(piece.strip())
        self.shown += len(piece)
        out = []
        while self.sent < len(ids):
            first, end = self.spans[self.sent]
            if end <= self.lead:  # wholly in the removed whitespace
                pass
            elif final:  # content [lead, shown): report what meets it
                if max(first, self.lead) >= min(end, self.shown):
                    self.sent = len(ids)  # the rest is the stop string's
                    break
                out.append(self.sent)
            elif self.started and first < self.shown:
                out.append(self.sent)
            else:  # its text is not released yet (held back for a stop string, or a partial character)
                break
            self.sent += 1
        return out


def reply_logprobs(tokenizer: Tokenizer, result: Result) -> list[TokenLogprobs] | None:
    """The TokenLogprobs a whole chat reply reports (ChatTokens): those of message.content's tokens."""
    if result.logprobs is None:
        return None
    return [result.logprobs[k] for k in ChatTokens(tokenizer).release(result.token_ids, result.text, final=True)]


def chat_logprobs(tokenizer: Tokenizer, logprobs: list[TokenLogprobs] | None) -> dict[str, Any] | None:
    """The chat API's logprobs: one entry per token with its bytes and the alternatives."""
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                        for t in logprobs]}


def model_card(engine: Engine, name: str, created: int) -> dict[str, Any]:
    """An entry of /v1/models: OpenAI's fields, and the model's context length and parameter count."""
    return {"id": name, "object": "model", "created": created, "owned_by": "simplegpt",
            "context_length": engine.config.n_positions, "parameters": engine.model.num_parameters()}
