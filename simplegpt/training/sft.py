"""Supervised fine-tuning's data step: the conversations of cfg.sft, the base model made ready for
chat (the chat markers in its vocabulary, the ChatML template on its tokenizer: before the optimizer
is built, as the grown embedding is a new Parameter), and the samplers the loop draws from.

Rows are (x, y, attention_mask) with y = IGNORE_INDEX wherever the loss counts nothing (system and
user tokens, the template's own text, padding), so the trainer's CrossEntropy counts exactly the
assistant's tokens, their end-of-turn marker included, on every way of running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..chat.sft_data import (EncodedChat, HeldOutSampler, SFTSampler, encode_conversations, load_conversations,
                             split_conversations)
from ..chat.template import ChatTemplate
from ..chat.vocab import add_chat_markers
from ..config import TrainConfig
from ..errors import DataError
from ..hf_tokenizer import HFTokenizer
from ..model import GPT
from ..tokenizer import Tokenizer


@dataclass
class SFTData:
    """What the trainer's data step needs of a fine-tuning run: a meta.json-like record of the data
    (source, tokens, vocab_size, val_bytes_per_token), the train sampler, the factory of the
    held-out one, the chat tokenizer to train and save with, the start line that says what the
    conversations gave (too-long ones counted), and the ids of the chat markers added to the base's
    vocabulary (a LoRA run trains their rows)."""

    meta: dict[str, Any]
    train: SFTSampler
    val: Callable[[], HeldOutSampler]
    tokenizer: HFTokenizer
    note: str
    new_tokens: list[int]


def load_sft(cfg: TrainConfig, model: GPT, tokenizer: Tokenizer) -> SFTData:
    """Read cfg.sft (checked against the base's tokenizer first, so a character the base cannot encode
    names its line), grow `model`'s vocabulary with the chat markers it lacks (in place), hold out
    val_fraction of the conversations and encode both parts with the chat template's loss mask.
    DataError (one line naming the line or row) for bad input, a character base, or no conversation
    that fits block_size; MissingDependencyError when `datasets` is needed and missing."""
    conversations = load_conversations(cfg.sft, tokenizer)
    if len(conversations) < 2:
        raise DataError(f"{cfg.sft} holds one conversation; fine-tuning holds some out for evaluation, so it "
                        "needs two or more")
    chat, added = add_chat_markers(model, tokenizer)
    template = ChatTemplate(chat.chat_template, chat)
    train, held_out = split_conversations(conversations, cfg.val_fraction, cfg.seed)
    train_chats, stats = encode_conversations(train, template, cfg.block_size + 1)
    val_chats, val_stats = encode_conversations(held_out, template, cfg.block_size + 1)
    pad = chat.eos_id
    sampler = SFTSampler(train_chats, cfg.block_size, cfg.batch_size, pad, cfg.seed, pack=cfg.sft_pack)
    per_eval = min(len(val_chats), cfg.eval_iters * cfg.batch_size)
    meta = {"source": cfg.sft, "tokens": {"train": stats.tokens, "val": val_stats.tokens},
            "vocab_size": chat.vocab_size, "val_bytes_per_token": _answer_bytes_per_token(val_chats, chat)}
    note = (f"fine-tuning on {cfg.sft}, rows of up to {cfg.block_size} tokens{', packed' if cfg.sft_pack else ''}: "
            f"{stats.summary()}\nheld out for evaluation: {val_stats.summary()}; each evaluation counts {per_eval:,} "
            "of them once (eval_iters x batch_size)\ntok/s and the tokens seen count the conversations' tokens, not the "
            "padding of their rows")
    return SFTData(meta, sampler, lambda: HeldOutSampler(val_chats, cfg.block_size, cfg.batch_size, pad), chat, note,
                   added)


def _answer_bytes_per_token(chats: list[EncodedChat], tokenizer: HFTokenizer) -> float:
    """The bytes of answer text per loss token of the held-out conversations (a special token such as the
    end-of-turn marker is no text: it counts as a token, not as bytes), for val bits per byte."""
    specials = set(tokenizer.special_tokens.values())
    tokens = sum(sum(c.mask) for c in chats)
    text = sum(len(tokenizer.decode_bytes([t])) for c in chats for t, m in zip(c.ids, c.mask)
               if m and t not in specials)
    return max(text, 1) / tokens  # every conversation kept has an answer: tokens > 0
