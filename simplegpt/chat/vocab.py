"""A base model made ready for chat fine-tuning: the chat markers in its vocabulary (new embedding
rows at the mean of the existing ones) and the ChatML template on its tokenizer."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn as nn

from ..errors import DataError
from ..hf_tokenizer import CHAT_TOKENS, HFTokenizer, as_hf_tokenizer
from ..model import GPT
from ..tokenizer import Tokenizer
from .template import CHATML_TEMPLATE


def chat_tokenizer(tokenizer: Tokenizer) -> tuple[HFTokenizer, list[int]]:
    """The tokenizer with the chat markers (<|im_start|>, <|im_end|>) and a chat template (ChatML
    unless it has one), and the ids it added (empty when it held the markers: a trained BPE's 1 and 2).
    Texts keep their ids. DataError for a character tokenizer, which cannot hold the markers."""
    try:
        hf = as_hf_tokenizer(tokenizer)
    except ValueError:
        raise DataError(f"the {tokenizer.kind} tokenizer cannot hold the chat markers {' and '.join(CHAT_TOKENS)}; "
                        "fine-tune a base prepared with --tokenizer byte, gpt2 or bpe:N") from None
    grown = hf.with_special_tokens(CHAT_TOKENS)
    added = list(range(hf.vocab_size, grown.vocab_size))
    if not grown.chat_template:
        grown = HFTokenizer(grown.json, grown.eos_id, kind=grown.kind, chat_template=CHATML_TEMPLATE)
    return grown, added


@torch.no_grad()
def grow_embeddings(model: GPT, vocab_size: int, new_ids: Sequence[int]) -> None:
    """Give `model` (in place) at least vocab_size token rows, and set the rows of new_ids to the mean
    of the other rows of its old vocabulary, in the token embedding and in the output head when it is
    not tied to it (a tied head follows the embedding). model.config.vocab_size becomes the new size.
    Call it before building the optimizer: the grown tables are new Parameters.
    ValueError for an id outside the new vocabulary."""
    wte = model.transformer.wte
    old = wte.weight.shape[0]
    size = max(old, vocab_size)
    if any(not 0 <= i < size for i in new_ids):
        raise ValueError(f"new token ids {list(new_ids)} do not fit a vocabulary of {size}")
    head = model.lm_head
    tied = head.weight is wte.weight
    keep = torch.ones(old, dtype=torch.bool, device=wte.weight.device)
    keep[[i for i in new_ids if i < old]] = False

    def grown(weight: torch.Tensor) -> nn.Parameter:
        rows = torch.empty(size, weight.shape[1], dtype=weight.dtype, device=weight.device)
        rows[:old] = weight
        rows[list(new_ids)] = weight[keep].mean(dim=0)
        return nn.Parameter(rows, requires_grad=weight.requires_grad)

    wte.weight = grown(wte.weight)
    wte.num_embeddings = size
    head.weight = wte.weight if tied else grown(head.weight)
    head.out_features = size
    model.config = dataclasses.replace(model.config, vocab_size=size)


def prepare_chat_model(model: GPT, tokenizer: Tokenizer) -> HFTokenizer:
    """chat_tokenizer(tokenizer), with `model`'s embedding grown to its vocabulary (grow_embeddings) when
    markers were added or its vocabulary is larger than the model's. Returns the tokenizer to train and
    save with. DataError for a character tokenizer."""
    return add_chat_markers(model, tokenizer)[0]


def add_chat_markers(model: GPT, tokenizer: Tokenizer) -> tuple[HFTokenizer, list[int]]:
    """prepare_chat_model, and the ids of the markers it added (their rows start at the mean: a LoRA run
    trains them, simplegpt.training.lora); empty when the tokenizer held them."""
    chat, added = chat_tokenizer(tokenizer)
    if added or chat.vocab_size > model.config.vocab_size:
        grow_embeddings(model, chat.vocab_size, added)
    return chat, added
