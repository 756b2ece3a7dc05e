"""The API's request bodies as pydantic models, with OpenAI's field names and defaults.

Unknown fields are refused (a 400 naming them), and so is text with a lone UTF-16 surrogate
("\ud800" is valid JSON but no Unicode text: no tokenizer can encode it, nor can the reply carry it
back as UTF-8); fields OpenAI has and simplegpt cannot honour
(presence_penalty, logit_bias, best_of, tools, ...) are accepted here and refused by
params.refuse_unsupported unless left at their defaults, so the error names what is unsupported.
Types are strict (a 400 naming the field): no value is coerced into another type, so `true` is no
count, "0.5" no temperature and 2.0 no n (a whole number is still a float where a float is asked).
"""

from __future__ import annotations

from typing import Any, Literal

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import APIError

_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate_at(value: Any, path: str) -> str | None:
    """The dotted path (messages.0.content) of the first string in value that holds a lone surrogate."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate_at(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


class TextRequest(BaseModel):
    """A request body whose text must be Unicode text: a string with a lone surrogate, in any field
    (prompt, messages, stop, ...) is a 400 naming that field, whatever the route and the tokenizer."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        where = _lone_surrogate_at(data, "")
        if where is not None:
            raise APIError(f"{where}: the text holds a lone UTF-16 surrogate (such as \\ud800), which is not "
                           "Unicode text; send text as UTF-8 or as properly paired \\u escapes", param=where)
        return data


class StreamOptions(BaseModel):
    """OpenAI's stream_options (only with stream: true). include_obfuscation is accepted and has no
    effect: simplegpt pads no event."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class SamplingRequest(TextRequest):
    """The sampling fields completions and chat share. A field sent as null takes its default, as
    some clients send every option they know of."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @property
    def wants_usage(self) -> bool:
        """A streamed response ends with a usage chunk (stream_options.include_usage)."""
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # simplegpt's own (OpenAI clients send them with extra_body)
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    truncate_prompt_tokens: int | None = None  # keep the prompt's last tokens, up to the context (vLLM's name)
    # OpenAI's, which simplegpt has no equivalent for: refused unless left at their defaults
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: a prompt is a string, a list of them, token ids, or lists of token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None  # the chosen token's log-probability and this many alternatives (0-5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    """One of OpenAI's content parts of a chat message (chat.chat_prompt takes text parts only)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: str
    text: str = ""


class ChatMessage(BaseModel):
    """One message of a chat: its text, or OpenAI's list of content parts. Text sent as a string is
    kept as one text part, so that a bad part is refused naming its field (messages.0.content.1.text)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: list[ContentPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_is_one_part(cls, content: Any) -> Any:
        return [{"type": "text", "text": content}] if isinstance(content, str) else content


class ChatRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class TokenizeRequest(TextRequest):
    """POST /tokenize (vLLM's route, which lm-evaluation-harness's API clients use): text to token ids.
    add_special_tokens is taken and has no effect: simplegpt's tokenizers add none."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeRequest(TextRequest):
    """POST /detokenize (vLLM's route): token ids to text."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tokens: list[int]
    model: str | None = None
