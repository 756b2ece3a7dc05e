"""Chat requests as prompts: through the checkpoint's chat template when its tokenizer has one,
else the messages as a plain-text prompt a base model continues."""

from __future__ import annotations

from ..chat import ChatTemplateError, PlainChat, chat_format, plain_prompt
from ..chat.template import PLAIN_STOP
from ..errors import UnknownCharacterError
from .errors import APIError
from .schemas import ChatMessage

CHAT_STOP = PLAIN_STOP  # a base model's reply ends where the model starts the user's next line
DEFAULT_CHAT_MAX_TOKENS = 256


def _messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages as {"role", "content"} text; APIError for content parts that are not text."""
    out = []
    for m in messages:
        if any(p.type != "text" for p in m.content or []):
            raise APIError("only text content parts are supported", param="messages")
        out.append({"role": m.role, "content": "".join(p.text for p in m.content or [])})
    return out


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The plain-text prompt a base model continues: system text, then 'User: ...' / 'Assistant: ...'
    lines, then 'Assistant:' (generation stops at the next 'User:' line). Raises APIError for
    content parts that are not text."""
    return plain_prompt(_messages(messages))


def chat_input(tokenizer, messages: list[ChatMessage]) -> tuple[str | list[int], list[str]]:
    """The prompt of a chat request and the stop strings that end its reply: the token ids of the
    tokenizer's chat template (with the opening of the assistant's turn) and its end-of-turn markers,
    or, for a tokenizer without a template, chat_prompt and CHAT_STOP. A 'developer' message is the
    template's 'system' one. APIError for non-text parts, a template that fails on the messages, or a
    base model whose vocabulary cannot spell the plain prompt."""
    fmt = chat_format(tokenizer)
    if isinstance(fmt, PlainChat):
        try:  # else the error would name characters of the prompt's frame, which the client never sent
            fmt.prompt_ids([{"role": "user", "content": ""}])
        except UnknownCharacterError as e:
            raise APIError("this model has no chat template, and its plain 'User: ... / Assistant:' chat prompt "
                           f"needs characters not in the character vocabulary ({', '.join(map(repr, e.chars))}); "
                           "send plain text to /v1/completions", param="messages") from None
        return chat_prompt(messages), [CHAT_STOP]
    turns = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in _messages(messages)]
    try:
        return fmt.prompt_ids(turns), list(fmt.stop)
    except ChatTemplateError as e:
        raise APIError(str(e), param="messages") from None
