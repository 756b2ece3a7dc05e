"""The chat template: messages -> text -> token ids, and which of those ids the loss counts.

A checkpoint's template is a Jinja string in Hugging Face's convention (the `chat_template` of
tokenizer_config.json), carried by its tokenizer (HFTokenizer.chat_template). It is rendered in
jinja2's ImmutableSandboxedEnvironment, so a template read from a file cannot run code or change
anything, with the variables `transformers`' apply_chat_template gives it: messages,
add_generation_prompt, bos_token, eos_token, raise_exception.

Base models have no template: they keep the plain one (PlainChat: "User: ..." / "Assistant: ..."
lines that the model continues, stopped at the next "\\nUser:").
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Sequence

from ..errors import DataError
from ..tokenizer import Tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML (Qwen's, SmolLM2's): <|im_start|>role\ncontent<|im_end|>\n per message, and with
# add_generation_prompt the opening of the assistant's turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Tokens that end a turn in common templates; the ones a tokenizer holds (and its EOS) stop a reply.
END_OF_TURN = (IM_END, "<|eot_id|>", "<|end|>", "<end_of_turn>")
PLAIN_STOP = "\nUser:"  # a base model's reply ends where it starts the user's next line
# Stand-ins for the messages' contents while rendering, to tell the template's own text from theirs
_SLOT = "\ue000{}\ue001"
_SLOT_RE = re.compile("\ue000(\\d+)\ue001")

Message = dict[str, Any]  # {"role": "system" | "user" | "assistant", "content": str}


class ChatTemplateError(DataError):
    """A chat template that cannot be compiled or rendered, or that renders conversations in a way
    whose assistant tokens cannot be found (each turn must extend the text of the turns before it)."""


def plain_prompt(messages: Sequence[Message]) -> str:
    """The plain-text prompt a base model continues: system text, then 'User: ...' / 'Assistant: ...'
    lines, then 'Assistant:' (the reply stops at PLAIN_STOP)."""
    parts = []
    for m in messages:
        if m["role"] in ("system", "developer"):
            parts.append(f"{m['content']}\n\n")
        else:
            parts.append(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n")
    return "".join(parts) + "Assistant:"


class PlainChat:
    """A base model's chat format (no template): plain_prompt, stopped at PLAIN_STOP."""

    stop: tuple[str, ...] = (PLAIN_STOP,)

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        return self.tokenizer.encode(plain_prompt(messages))


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ChatTemplateError(f"the chat template refused the messages: {message}")

    # trim_blocks and lstrip_blocks as transformers sets them, so a template renders the same text
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja: {e}") from None


class ChatTemplate:
    """A Jinja chat template over a tokenizer that holds its special tokens (an HFTokenizer).

    render(messages) gives the text; encode(messages) its token ids, where the template's own
    special-token text (e.g. <|im_start|>) becomes the special tokens and the messages' contents are
    encoded as plain text (a user typing "<|im_end|>" gets the characters, not the marker; this is
    where simplegpt differs from apply_chat_template, which parses specials everywhere).
    stop: the texts that end a reply (the end-of-turn markers the tokenizer holds, and its EOS).
    """

    def __init__(self, source: str, tokenizer: Tokenizer):
        self.source = source
        self.tokenizer = tokenizer
        self._template = _compile(source)
        specials: dict[str, int] = dict(getattr(tokenizer, "special_tokens", {}) or {})
        self.specials = specials
        self._special_re = (re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
                            if specials else None)
        eos_text = tokenizer.decode_bytes([tokenizer.eos_id]).decode("utf-8", errors="replace")
        self.eos_token = eos_text
        self.stop_ids = [specials[t] for t in END_OF_TURN if t in specials]
        if tokenizer.eos_id not in self.stop_ids:
            self.stop_ids.append(tokenizer.eos_id)
        self.stop = tuple(t for t in END_OF_TURN if t in specials) + ((eos_text,) if eos_text else ())

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The template's text of the messages (with add_generation_prompt, followed by the opening
        of the assistant's turn). ChatTemplateError when the template fails on them."""
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.eos_token, eos_token=self.eos_token)
        except TemplateError as e:  # the sandbox's SecurityError included
            raise ChatTemplateError(f"the chat template failed: {e}") from None

    def _pieces(self, messages: Sequence[Message], add_generation_prompt: bool) -> tuple[str, list[str | int]]:
        """The rendered text, and it as plain-text pieces and special-token ids, in order. Special-token
        text counts as the token only where the template wrote it; when the template changes the
        contents (so its own text cannot be told apart), everywhere, as in transformers."""
        text = self.render(messages, add_generation_prompt)
        slotted = self.render([{**m, "content": _SLOT.format(i)} for i, m in enumerate(messages)],
                              add_generation_prompt)
        parts = _SLOT_RE.split(slotted)  # template text, message index, template text, ...
        pieces: list[tuple[str, bool]] = [(p if k % 2 == 0 else str(messages[int(p)]["content"]), k % 2 == 0)
                                          for k, p in enumerate(parts)]
        if "".join(p for p, _ in pieces) != text:
            pieces = [(text, True)]
        out: list[str | int] = []
        for piece, by_template in pieces:
            at = 0
            for m in (self._special_re.finditer(piece) if by_template and self._special_re else ()):
                out += [piece[at:m.start()], self.specials[m.group()]]
                at = m.end()
            out.append(piece[at:])
        merged: list[str | int] = []
        for p in out:
            if isinstance(p, str) and merged and isinstance(merged[-1], str):
                merged[-1] += p
            elif p != "":
                merged.append(p)
        return text, merged

    def _encode(self, messages: Sequence[Message],
                add_generation_prompt: bool) -> tuple[str, list[int], list[int], list[int]]:
        """The text, its ids, each id's end as a byte offset into the text's UTF-8, and the character
        offsets where the end-of-turn markers the template wrote end."""
        text, pieces = self._pieces(messages, add_generation_prompt)
        ids: list[int] = []
        turn_ends, chars = [], 0
        for p in pieces:
            if isinstance(p, int):
                ids.append(p)
                chars += len(self.tokenizer.decode_bytes([p]).decode("utf-8"))
                if p in self.stop_ids:
                    turn_ends.append(chars)
            else:
                ids += self.tokenizer.encode(p)
                chars += len(p)
        ends, at = [], 0
        for t in ids:
            at += len(self.tokenizer.decode_bytes([t]))
            ends.append(at)
        if at != len(text.encode("utf-8")):
            raise ChatTemplateError("the tokenizer does not give back the rendered text's exact bytes, so the "
                                    "assistant's tokens cannot be located; use a byte-level tokenizer")
        return text, ids, ends, turn_ends

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[int]:
        """The token ids of the rendered messages."""
        return self._encode(messages, add_generation_prompt)[1]

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The ids a model continues to answer the messages: encode(messages, add_generation_prompt=True)."""
        return self.encode(messages, add_generation_prompt=True)

    def encode_with_mask(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
        """The ids of the whole conversation and, per id, whether the loss counts it: exactly the
        assistant turns' tokens, from the first token after the template's opening of the turn to its
        end-of-turn marker included (the template's text after the marker, and every system and user
        token, carry no loss). Both lists have the same length. ChatTemplateError for a template that
        does not render the conversation turn by turn (each turn's text extending the previous)."""
        text, ids, ends, turn_ends = self._encode(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
                raise ChatTemplateError(f"the chat template does not render the conversation turn by turn (message "
                                        f"{i + 1}, the assistant's, does not extend the text before it), so its "
                                        "tokens cannot be found")
            start, end = len(before), len(through)
            # the turn ends with its end-of-turn marker: the first the template wrote after its opening
            end = min([e for e in turn_ends if start < e <= end], default=end)
            spans.append((len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8"))))
        mask, begin = [], 0
        for e in ends:
            mask.append(any(begin < hi and e > lo for lo, hi in spans))
            begin = e
        return ids, mask


def chat_format(tokenizer: Tokenizer) -> ChatTemplate | PlainChat:
    """How to prompt a model with this tokenizer: its chat template, or the plain one when it has none.
    ChatTemplateError for a template that does not compile."""
    source = getattr(tokenizer, "chat_template", None)
    return ChatTemplate(source, tokenizer) if source else PlainChat(tokenizer)
