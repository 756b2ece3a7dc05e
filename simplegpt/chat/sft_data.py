"""Supervised fine-tuning data: conversations read from OpenAI-style JSONL or Hugging Face `datasets`,
encoded with the chat template's loss mask, and batched as (x, y, attention_mask) rows in which y is
IGNORE_INDEX (-100) wherever no loss is counted.

A JSONL line is {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]};
a `datasets` row has the same "messages" (or "conversations") column. Bad input is a DataError of one
line that names where it is: "chats.jsonl:7: unknown role 'tool' in message 2 (...)".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..data.sources import jsonl_records
from ..errors import DataError, MissingDependencyError, UnknownCharacterError
from ..model import IGNORE_INDEX
from ..tokenizer import Tokenizer
from .template import ChatTemplate, Message

ROLES = ("system", "user", "assistant")
COLUMNS = ("messages", "conversations")  # where a record keeps its messages


@dataclass
class Conversation:
    """One conversation: messages as {"role", "content"} dicts, and where it was read ("chats.jsonl:3",
    "dataset[3]") for the messages that name it."""

    messages: list[Message]
    where: str


def parse_conversation(record: Any, where: str) -> Conversation:
    """The conversation of one record ({"messages": [...]}); DataError naming `where` for a record
    that is not one, a message without a text content, a role other than ROLES, or no assistant turn.
    A content given as OpenAI's list of text parts is joined into one string."""
    column = next((c for c in COLUMNS if isinstance(record, dict) and c in record), None)
    if column is None or not isinstance(record[column], list):
        found = (f"an object with keys {sorted(record)[:5]}" if isinstance(record, dict)
                 else f"a {type(record).__name__}")
        raise DataError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}, found {found}')
    messages = []
    for n, m in enumerate(record[column], 1):
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(f'{where}: message {n} is not an object with a "role" and a "content"')
        if m["role"] not in ROLES:
            raise DataError(f"{where}: unknown role {str(m['role'])[:40]!r} in message {n}; the roles are "
                            f"{', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise DataError(f"{where}: message {n} ({m['role']}) has no text content")
        messages.append({"role": m["role"], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing in it would be learned")
    return Conversation(messages, where)


def read_jsonl(path: str | os.PathLike) -> list[Conversation]:
    """The conversations of a JSONL file, one per non-blank line. DataError naming the file and the
    line (numbered from 1) for a line that is not UTF-8, not JSON, or not a conversation
    (parse_conversation); OSError when the file cannot be read."""
    path = Path(path)
    out = [parse_conversation(record, where) for where, record in jsonl_records(path)]
    if not out:
        raise DataError(f"{path} holds no conversations")
    return out


def dataset_conversations(dataset: Iterable[dict], name: str = "dataset") -> list[Conversation]:
    """The conversations of a Hugging Face `datasets` Dataset (or any sequence of records) in the
    conversational format: a "messages" (or "conversations") column of {"role", "content"} dicts.
    DataError naming the row as name[i] (numbered from 0, as datasets does)."""
    out = [parse_conversation(row, f"{name}[{i}]") for i, row in enumerate(dataset)]
    if not out:
        raise DataError(f"{name} holds no conversations")
    return out


def load_conversations(source: str | os.PathLike | Iterable[dict],
                       tokenizer: Tokenizer | None = None) -> list[Conversation]:
    """Conversations from a JSONL file, a folder written by `datasets`' save_to_disk, a .parquet file,
    'hf:NAME[:CONFIG]' (the train split of a Hugging Face dataset), or a `datasets` Dataset (any
    iterable of records). With a tokenizer, every conversation's text is
    checked to encode with it: a character vocabulary that lacks a character is a DataError naming the
    line. DataError for bad input (see read_jsonl), a missing source, or a folder or .parquet file that
    `datasets` cannot read; MissingDependencyError when `datasets` is needed and missing; OSError for an
    unreadable JSONL file."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if str(source).startswith("hf:"):
            conversations = dataset_conversations(_hub_dataset(str(source)[3:]), str(source))
        elif not path.exists():
            raise DataError(f"{source}: no such file or folder; give a JSONL file, a folder written by datasets' "
                            "save_to_disk, a .parquet file or hf:NAME")
        elif path.is_dir() or path.suffix == ".parquet":
            conversations = dataset_conversations(_local_dataset(path), path.name)
        else:
            conversations = read_jsonl(path)
    else:
        conversations = dataset_conversations(source)
    if tokenizer is not None:
        for c in conversations:
            check_encodes(c, tokenizer)
    return conversations


def _datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError(f"reading {what} needs Hugging Face datasets: "
                                     'pip install "simplegpt-toolkit[datasets]"') from None
    return datasets


def _local_dataset(path: Path) -> Any:
    """The Dataset of a save_to_disk folder or a .parquet file; DataError of one line when it is neither."""
    datasets = _datasets(str(path))
    try:
        if path.is_dir():
            return datasets.load_from_disk(str(path))
        import pyarrow.parquet  # datasets' own reader; read here first, as datasets would also log the failure
        pyarrow.parquet.read_schema(path)
        return datasets.Dataset.from_parquet(str(path))
    except (OSError, ValueError) as e:  # datasets: FileNotFoundError for another folder; pyarrow: ArrowInvalid
        what = "a folder written by datasets' save_to_disk" if path.is_dir() else "a Parquet file"
        raise DataError(f"{path}: not {what} ({_first_line(e) or type(e).__name__})") from None


def _first_line(error: BaseException) -> str:
    """The first line of an error's message ("" for none): libraries' messages run over many lines."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _hub_dataset(spec: str) -> Any:
    """The train split of the Hugging Face dataset spec ("NAME" or "NAME:CONFIG"); DataError of one line
    when it cannot be opened (offline, unknown name)."""
    name, _, config = spec.partition(":")
    datasets = _datasets(f"hf:{spec}")
    try:
        return datasets.load_dataset(name, config or None, split="train")
    except Exception as e:  # offline, unknown name, bad config: datasets raises many types
        raise DataError(f"could not open the Hugging Face dataset {spec!r} ({type(e).__name__}: {_first_line(e)}); "
                        "check the name and the network, or give a JSONL file or a save_to_disk folder") from None


def check_encodes(conversation: Conversation, tokenizer: Tokenizer) -> None:
    """DataError naming the conversation when a message holds characters the tokenizer has no token
    for (a character vocabulary built from another text)."""
    for m in conversation.messages:
        if tokenizer.known_text(m["content"])[1]:
            try:
                tokenizer.encode(m["content"])
            except UnknownCharacterError as e:
                raise DataError(f"{conversation.where}: the base model's {tokenizer.kind} tokenizer cannot encode "
                                f"it: {e}") from None


def split_conversations(conversations: Sequence[Conversation], val_fraction: float,
                        seed: int = 0) -> tuple[list[Conversation], list[Conversation]]:
    """(train, val): a seeded random val_fraction of the conversations held out for evaluation (at
    least one when val_fraction > 0 and there are two or more), the rest in their order.
    ValueError for a fraction outside [0, 1)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(conversations)
    k = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    return ([c for i, c in enumerate(conversations) if i not in held],
            [c for i, c in enumerate(conversations) if i in held])


@dataclass
class EncodedChat:
    """A conversation's token ids and loss mask (True: the loss counts the token), same length."""

    ids: list[int]
    mask: list[bool]
    where: str


@dataclass
class SFTStats:
    """What encode_conversations kept: conversations, those shortened to the answers that fit,
    those dropped (not even their first answer fits), and the tokens kept / counted by the loss."""

    conversations: int = 0
    shortened: int = 0
    dropped: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    max_tokens: int = 0

    def summary(self) -> str:
        """One line for the training log."""
        line = (f"{self.conversations - self.dropped:,} of {self.conversations:,} conversations, {self.tokens:,} "
                f"tokens, {self.loss_tokens:,} of them the assistant's")
        if self.shortened or self.dropped:
            line += (f"; longer than {self.max_tokens} tokens: {self.shortened:,} cut after the last whole answer "
                     f"that fits, {self.dropped:,} left out (their first answer does not fit)")
        return line


def encode_conversations(conversations: Sequence[Conversation], template: ChatTemplate,
                         max_tokens: int) -> tuple[list[EncodedChat], SFTStats]:
    """Each conversation's ids and mask (ChatTemplate.encode_with_mask). One longer than max_tokens
    (a row: block_size + 1) is never cut inside an answer: it keeps its turns up to the last assistant
    turn that ends within max_tokens, or is left out when its first does not; both are counted in the
    stats. ChatTemplateError when the template cannot render a conversation."""
    stats = SFTStats(conversations=len(conversations), max_tokens=max_tokens)
    out = []
    for c in conversations:
        ids, mask = template.encode_with_mask(c.messages)
        if len(ids) > max_tokens:
            # the ends of the assistant turns: where a run of loss tokens stops
            ends = [i + 1 for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
            fits = [e for e in ends if e <= max_tokens]
            if not fits:
                stats.dropped += 1
                continue
            stats.shortened += 1
            ids, mask = ids[: fits[-1]], mask[: fits[-1]]
        stats.tokens += len(ids)
        stats.loss_tokens += sum(mask)
        out.append(EncodedChat(ids, mask, c.where))
    if not out:
        raise DataError(f"no conversation fits {max_tokens} tokens up to the end of its first answer; use a "
                        "larger block_size or shorter conversations")
    return out, stats


class SFTSampler:
    """Seeded random batches of rows of up to block_size targets built from whole conversations:
    x (B, T) ids, y (B, T) the next ids with IGNORE_INDEX where the loss counts nothing (system and
    user tokens, template text, padding), attention_mask (B, T) 1 = token, 0 = padding; T is the
    longest row of the batch (at most block_size), as in the pretraining PaddedSampler.

    pack=False (the default) puts one conversation in each row, which then sees what it sees when
    chatting (its own turns, from position 0). pack=True fills each row with as many whole
    conversations as fit (in a seeded order): fewer rows, but a row's later conversations attend to
    its earlier ones, as in packed pretraining. Rows are padded on the right with pad_id. The
    generator state is the sampler's state (state_dict), so a resumed run draws the same batches."""

    def __init__(self, chats: Sequence[EncodedChat], block_size: int, batch_size: int, pad_id: int, seed: int,
                 pack: bool = False):
        if not chats:
            raise DataError("no conversations to fine-tune on")
        self.block_size = block_size
        self.batch_size = batch_size
        self.pad_id = pad_id
        order = np.random.default_rng(seed).permutation(len(chats)) if pack else range(len(chats))
        rows: list[list[EncodedChat]] = []
        used = block_size + 2  # tokens in the row being filled: none open yet
        for i in order:
            c = chats[i]
            if len(c.ids) > block_size + 1:
                raise ValueError(f"{c.where}: {len(c.ids)} tokens, more than a row's {block_size + 1}; encode with "
                                 "encode_conversations(..., max_tokens=block_size + 1)")
            if not pack or used + len(c.ids) > block_size + 1:
                rows.append([])
                used = 0
            rows[-1].append(c)
            used += len(c.ids)
        self.rows = [self._row(r) for r in rows]
        self.rng = np.random.default_rng(seed)

    def _row(self, chats: list[EncodedChat]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = [t for c in chats for t in c.ids]
        mask = [m for c in chats for m in c.mask]
        T, n = self.block_size, len(ids) - 1
        x = torch.full((T,), self.pad_id, dtype=torch.long)
        y = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros(T, dtype=torch.long)
        x[:n] = torch.tensor(ids[:-1])
        targets = torch.tensor(ids[1:])
        y[:n] = torch.where(torch.tensor(mask[1:]), targets, IGNORE_INDEX)
        attention[:n] = 1
        return x, y, attention

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, y, attention_mask: each (batch_size, T) int64, T the longest row in the batch."""
        picks = self.rng.integers(0, len(self.rows), size=self.batch_size)
        x, y, attention = (torch.stack(column) for column in zip(*(self.rows[i] for i in picks)))
        T = int(attention.sum(dim=1).max())
        return x[:, :T], y[:, :T], attention[:, :T]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


class HeldOutSampler(SFTSampler):
    """The held-out conversations for evaluation, each once, in order: batches of batch_size rows (one
    conversation a row; the last batch may be shorter), then batches of one padding column without a
    loss token, which add nothing to an evaluation's mean. An evaluation of any number of batches
    thus counts each held-out conversation at most once, the same ones every time."""

    def __init__(self, chats: Sequence[EncodedChat], block_size: int, batch_size: int, pad_id: int):
        super().__init__(chats, block_size, batch_size, pad_id, seed=0)
        self.at = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, y, attention_mask: each (rows, T) int64, T the longest row in the batch."""
        rows = self.rows[self.at: self.at + self.batch_size]
        self.at += len(rows)
        if not rows:
            return (torch.full((self.batch_size, 1), self.pad_id), torch.full((self.batch_size, 1), IGNORE_INDEX),
                    torch.ones(self.batch_size, 1, dtype=torch.long))
        x, y, attention = (torch.stack(column) for column in zip(*rows))
        T = int(attention.sum(dim=1).max())
        return x[:, :T], y[:, :T], attention[:, :T]
