"""Chat models: the chat template (template.py), supervised fine-tuning data (sft_data.py) and the
chat markers added to a base model's vocabulary (vocab.py)."""

from .template import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError, PlainChat, chat_format, plain_prompt

__all__ = ["CHATML_TEMPLATE", "ChatTemplate", "ChatTemplateError", "PlainChat", "chat_format", "plain_prompt"]
