"""Fine-tuning data: conversations from JSONL and Hugging Face datasets, bad lines named by number,
masked (x, y) rows with IGNORE_INDEX where no loss counts, answers never cut, a held-out split."""

import json

import pytest
import torch

from simplegpt import get_tokenizer
from simplegpt.chat import ChatTemplate
from simplegpt.chat.sft_data import (SFTSampler, encode_conversations, load_conversations, read_jsonl,
                                     split_conversations)
from simplegpt.chat.vocab import chat_tokenizer
from simplegpt.errors import DataError
from simplegpt.model import IGNORE_INDEX


def chat(user: str, answer: str, system: str | None = None) -> dict:
    head = [{"role": "system", "content": system}] if system else []
    return {"messages": [*head, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write(path, lines) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    tok, _ = chat_tokenizer(get_tokenizer("byte"))
    return ChatTemplate(tok.chat_template, tok)


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]},
     "chats.jsonl:3: unknown role 'tool' in message 2; the roles are system, user, assistant"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
     "chats.jsonl:3: the conversation has no assistant turn"),
    ('{"messages": [', "chats.jsonl:3: not a JSON line"),
    ({"text": "hello"}, 'chats.jsonl:3: expected {"messages": '),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
     "chats.jsonl:3: message 1 (user) has no text content"),
])
def test_bad_lines_are_one_line_naming_their_number(tmp_path, bad, message):
    path = write(tmp_path / "chats.jsonl", [chat("a", "b"), "", bad, chat("c", "d")])  # line 2 is blank
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_char_vocabulary_that_cannot_encode_the_file_names_the_line(tmp_path):
    path = write(tmp_path / "chats.jsonl", [chat("abc", "cab"), chat("abc", "{a}")])
    with pytest.raises(DataError, match=r"chats.jsonl:2: the base model's char tokenizer cannot encode it: "
                                        r"characters '\{' \(U\+007B\), '\}'"):
        load_conversations(path, get_tokenizer("char", "abc"))
    assert len(load_conversations(path, get_tokenizer("byte"))) == 2


def test_openai_content_parts_and_datasets_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": "c"}]}
    [c] = read_jsonl(write(tmp_path / "p.jsonl", [parts]))
    assert c.messages[0] == {"role": "user", "content": "ab"} and c.where.endswith("p.jsonl:1")
    rows = [chat("q1", "a1", system="s"), chat("q2", "a2")]
    ds = datasets.Dataset.from_list(rows)
    assert [c.messages for c in load_conversations(ds)] == [r["messages"] for r in rows]
    ds.save_to_disk(str(tmp_path / "saved"))
    assert [c.messages for c in load_conversations(tmp_path / "saved")] == [r["messages"] for r in rows]
    bad = datasets.Dataset.from_list([chat("q", "a"), {"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DataError, match=r"dataset\[1\]: the conversation has no assistant turn"):
        load_conversations(bad)


def test_rows_count_loss_only_on_answers_and_pad_with_ignore_index(template):
    convs = load_conversations([chat("hi", "yo"), chat("add 3 and 4", "7", system="s")])
    chats, stats = encode_conversations(convs, template, max_tokens=129)
    assert stats.loss_tokens == len("yo") + 1 + len("7") + 1 and stats.dropped == stats.shortened == 0
    for pack in (False, True):
        sampler = SFTSampler(chats, block_size=128, batch_size=8, pad_id=0, seed=1, pack=pack)
        assert len(sampler.rows) == (1 if pack else 2)
        x, y, attention = sampler.next_batch()
        longest = sum(len(c.ids) for c in chats) - 1 if pack else max(len(c.ids) for c in chats) - 1
        assert x.shape == y.shape == attention.shape == (8, longest)  # the longest row of the batch
        for row_x, row_y, row_a in zip(x, y, attention):
            n = int(row_a.sum())
            learned = template.tokenizer.decode(row_y[row_y != IGNORE_INDEX].tolist())
            assert learned in ("yo<|im_end|>", "7<|im_end|>", "yo<|im_end|>7<|im_end|>", "7<|im_end|>yo<|im_end|>")
            assert (row_y[n:] == IGNORE_INDEX).all() and (row_a[n:] == 0).all()
            assert torch.equal(row_x[1:n], torch.where(row_y[:n - 1] == IGNORE_INDEX, row_x[1:n], row_y[:n - 1]))
    # the loss counts exactly those targets: F.cross_entropy's ignore_index skips the rest
    logits = torch.randn(8, longest, template.tokenizer.vocab_size)
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
    keep = y.flatten() != IGNORE_INDEX
    assert full == pytest.approx(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1)[keep],
                                                                         y.flatten()[keep], reduction="sum")))


def test_long_conversations_are_cut_after_a_whole_answer_or_left_out_and_counted(template):
    long_answer = chat("q", "x" * 100)
    two_turns = {"messages": [*chat("q", "short")["messages"], *chat("again", "y" * 100)["messages"]]}
    convs = load_conversations([chat("hi", "yo"), long_answer, two_turns])
    chats, stats = encode_conversations(convs, template, max_tokens=65)
    assert (stats.conversations, stats.shortened, stats.dropped) == (3, 1, 1)
    assert "1 cut after the last whole answer that fits, 1 left out" in stats.summary()
    cut = chats[1]
    assert template.tokenizer.decode(cut.ids).endswith("assistant\nshort<|im_end|>") and cut.mask[-1]
    with pytest.raises(DataError, match="no conversation fits 20 tokens"):
        encode_conversations(convs[1:2], template, max_tokens=20)


def test_sampler_state_resumes_the_same_batches_and_split_is_seeded(template):
    convs = load_conversations([chat(f"q{i}", f"a{i}") for i in range(20)])
    train, val = split_conversations(convs, 0.1, seed=3)
    assert len(val) == 2 and len(train) == 18 and not {c.where for c in train} & {c.where for c in val}
    assert [c.where for c in split_conversations(convs, 0.1, seed=3)[1]] == [c.where for c in val]
    assert split_conversations(convs[:1], 0.5)[1] == []  # one conversation stays for training
    chats, _ = encode_conversations(train, template, max_tokens=65)
    a = SFTSampler(chats, 64, 4, 0, seed=5)
    a.next_batch()
    state = a.state_dict()
    want = [a.next_batch() for _ in range(3)]
    b = SFTSampler(chats, 64, 4, 0, seed=5)
    b.load_state_dict(state)
    for got, w in zip([b.next_batch() for _ in range(3)], want):
        assert all(torch.equal(g, v) for g, v in zip(got, w))
