"""Chat over a base model: the messages as a plain-text prompt the model continues."""

from __future__ import annotations

from .errors import APIError
from .schemas import ChatMessage

CHAT_STOP = "\nUser:"  # a reply ends where the model starts the user's next line
DEFAULT_CHAT_MAX_TOKENS = 256


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The plain-text prompt a base model continues: system text, then 'User: ...' / 'Assistant: ...'
    lines, then 'Assistant:' (generation stops at the next 'User:' line). Raises APIError for
    content parts that are not text."""
    parts: list[str] = []
    for m in messages:
        if any(p.type != "text" for p in m.content or []):
            raise APIError("only text content parts are supported", param="messages")
        text = "".join(p.text for p in m.content or [])
        if m.role in ("system", "developer"):
            parts.append(f"{text}\n\n")
        else:
            parts.append(f"{'User' if m.role == 'user' else 'Assistant'}: {text}\n")
    return "".join(parts) + "Assistant:"
