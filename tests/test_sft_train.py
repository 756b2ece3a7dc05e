"""`simplegpt train --sft`: supervised fine-tuning through the trainer (training/sft.py).

A base whose vocabulary lacks the chat markers is fine-tuned and resumed bit for bit (one process; core
shards and DDP against it); the trainer's loss takes exactly the assistant's tokens; a tiny model learns
to answer held-out questions; bad input is one line naming its line.
"""

import json
import os
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ways_worker as w
from simplegpt import get_tokenizer
from simplegpt.chat import chat_format
from simplegpt.chat.sft_data import EncodedChat, load_conversations
from simplegpt.chat.vocab import prepare_chat_model
from simplegpt.checkpoint import load_checkpoint, save_checkpoint
from simplegpt.cli import main
from simplegpt.config import SFT_DEFAULTS, load_config
from simplegpt.errors import DataError
from simplegpt.model import GPT, GPTConfig
from simplegpt.training.loop import train
from simplegpt.training.loss import CrossEntropy
from simplegpt.training.sft import load_sft

from conftest import make_tiny_gpt

ROOT = Path(__file__).resolve().parents[1]
IM_START, IM_END = 257, 258  # where the chat markers go in the byte vocabulary (0-255 bytes, 256 end-of-text)
STEPS = 8


def conversation(user: str, answer: str, system: str = "Be brief.") -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A random byte-level base (no chat markers) and 60 short sums as conversations."""
    root = tmp_path_factory.mktemp("sft")
    tok = get_tokenizer("byte")
    save_checkpoint(root / "base", make_tiny_gpt(vocab_size=tok.vocab_size, n_positions=80), tok)
    rng = random.Random(0)
    chats = []
    for _ in range(60):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        chats.append(conversation(f"add {a} and {b}", str(a + b)))
    write_jsonl(root / "chats.jsonl", chats)
    return root


def settings(work: Path, **kw) -> dict:
    """A tiny fine-tuning run: 8 steps of 2 micro-batches of 4 conversations, evaluating every 4 steps."""
    # the base's shape given too: the contract resumes with these settings, not the checkpoint's saved ones
    return dict(sft=str(work / "chats.jsonl"), init_from=str(work / "base"), tokenizer="byte", n_layer=2, n_head=2,
                n_embd=32, block_size=80, batch_size=4, grad_accum_steps=2,
                max_iters=STEPS, warmup_iters=2, eval_interval=4, eval_iters=2, num_threads=1, fused=False,
                peak_flops=1e12, dist_timeout=60, **kw)


@pytest.fixture(scope="module")
def one_process(work) -> dict:
    torch.set_num_threads(1)
    return w.contract(settings(work, cpu_shards=1), work, "single")


def check_contract(seen: dict, reference: dict, exact: bool) -> None:
    """Every step's loss and val loss as one process's (bit for bit, or within float sums in another
    order); stopped by a signal after step SIGNAL_STEP and resumed to the uninterrupted run's, bit for bit."""
    def steps(run: dict, key: str) -> dict[int, float]:  # a torchrun worker's JSON has the steps as strings
        return {int(k): v for k, v in run[key].items()}

    want, got = steps(reference, "whole"), steps(seen, "whole")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert abs(got[step] - want[step]) <= (0 if exact else 1e-5), step
    for step, val in steps(reference, "whole_val").items():
        assert abs(steps(seen, "whole_val")[step] - val) <= (0 if exact else 1e-5)
    assert seen["interrupted"] == "SIGTERM" and seen["stopped_step"] == w.SIGNAL_STEP
    assert seen["resumed_step"] == STEPS
    assert steps(seen, "after_resume") == got and steps(seen, "after_resume_val") == steps(seen, "whole_val")


def test_a_base_without_markers_is_fine_tuned_and_resumes_bit_exactly(work, one_process):
    check_contract(one_process, one_process, exact=True)
    ck = load_checkpoint(work / "single_stopped" / "last")
    # the markers joined the vocabulary (the model's rows too) and the checkpoint keeps the template
    specials = ck.tokenizer.special_tokens
    assert specials["<|im_start|>"] == IM_START and specials["<|im_end|>"] == IM_END
    assert ck.model.config.vocab_size == ck.tokenizer.vocab_size == 259
    assert "<|im_start|>" in ck.tokenizer.chat_template
    meta = json.loads((work / "single_stopped" / "last" / "config.json").read_text())
    assert meta["dataset"]["source"] == str(work / "chats.jsonl")
    assert meta["train_config"]["sft"] == str(work / "chats.jsonl")


def test_core_shards_fine_tune_as_one_process(work, one_process):
    torch.set_num_threads(1)
    check_contract(w.contract(settings(work, cpu_shards=2), work, "shards"), one_process, exact=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun on gloo, as tests/test_ways_of_running.py")
def test_ddp_fine_tunes_as_one_process(work, one_process):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    spec = {"name": "ddp", "settings": settings(work, parallel="ddp")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "ways_worker.py"), str(work), json.dumps(spec)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    check_contract(json.loads((work / "ddp.json").read_text()), one_process, exact=False)


def test_the_trainers_loss_takes_exactly_the_assistants_tokens(tmp_path):
    """Through the trainer's data step and loss: a two-turn conversation's loss is the mean over its two
    answers and their end-of-turn markers, computed by hand from ids written out here."""
    tok = get_tokenizer("byte")
    save_checkpoint(tmp_path / "base", make_tiny_gpt(vocab_size=tok.vocab_size, n_positions=128, scale=4.0), tok)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add 3 and 4"},
                {"role": "assistant", "content": "7"}, {"role": "user", "content": "and 5 and 6?"},
                {"role": "assistant", "content": "11"}]
    write_jsonl(tmp_path / "chats.jsonl", [{"messages": messages}] * 2)
    cfg = load_config(None, {"sft": str(tmp_path / "chats.jsonl"), "init_from": str(tmp_path / "base"),
                             "batch_size": 1})
    loaded = load_checkpoint(tmp_path / "base")
    model = loaded.model
    sft = load_sft(cfg, model, loaded.tokenizer)

    def text(s: str) -> list[int]:
        return list(s.encode())

    ids, loss_at = [], []  # loss_at: the positions of the ids the loss must predict
    for role, content, nl in (("system", "Be brief.", True), ("user", "add 3 and 4", True), ("assistant", "7", True),
                              ("user", "and 5 and 6?", True), ("assistant", "11", True)):
        ids += [IM_START] + text(f"{role}\n")
        if role == "assistant":
            loss_at += range(len(ids), len(ids) + len(content) + 1)  # the answer and its <|im_end|>
        ids += text(content) + [IM_END] + text("\n")
    loss = CrossEntropy()
    x, y, attention = loss.prepare(sft.train.next_batch())
    assert x[0].tolist() == ids[:-1] and attention.all()
    with torch.no_grad():
        trainer_loss = float(loss(model, x, y, attention))
        logits, _ = model(torch.tensor([ids[:-1]]))
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        by_hand = -sum(float(logp[i - 1, ids[i]]) for i in loss_at) / len(loss_at)
    assert loss.tokens((x, y, attention)) == len(loss_at) == 5
    assert abs(trainer_loss - by_hand) < 1e-5


def test_sft_defaults_apply_to_a_pretraining_config_and_follow_the_base(work):
    cfg = load_config(None, {"sft": str(work / "chats.jsonl"), "init_from": str(work / "base")})
    assert (cfg.lr, cfg.max_iters, cfg.eval_interval) == (SFT_DEFAULTS["lr"], SFT_DEFAULTS["max_iters"],
                                                          SFT_DEFAULTS["eval_interval"])
    assert cfg.block_size == 80  # the base's context, not the config file's 64
    assert cfg.out_dir == os.path.join("out", "chats_from_base")
    given = load_config(None, {"sft": "c.jsonl", "init_from": str(work / "base"), "lr": 1e-3, "block_size": 32})
    assert (given.lr, given.block_size) == (1e-3, 32) and abs(given.min_lr - 1e-4) < 1e-12  # the file's ratio


# The learning test: a random base learns, from conversations, to answer with the one digit hidden among
# the letters of the question, behind a system prompt of random letters. Held-out questions are new strings.
def digit_question(rng: random.Random) -> tuple[str, str]:
    letters = [rng.choice(string.ascii_lowercase) for _ in range(6)]
    digit = rng.choice(string.digits)
    letters.insert(rng.randint(0, 6), digit)
    return "".join(letters), digit


def noisy_chat(question: str, rng: random.Random) -> list[dict]:
    noise = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(30))
    return [{"role": "system", "content": noise}, {"role": "user", "content": f"digit {question}"}]


def correct_answers(model: GPT, tokenizer, questions: list[tuple[str, str]], rng: random.Random) -> int:
    """How many questions `model` answers with exactly their digit, prompted as `simplegpt chat` does (the
    checkpoint's chat format), greedily, up to the end-of-turn marker."""
    fmt = chat_format(tokenizer)
    right = 0
    model.eval()
    with torch.no_grad():
        for question, digit in questions:
            ids = fmt.prompt_ids(noisy_chat(question, rng))
            reply: list[int] = []
            for _ in range(4):
                logits, _ = model(torch.tensor([ids + reply]))
                token = int(logits[0, -1].argmax())
                if token in fmt.stop_ids:
                    break
                reply.append(token)
            right += tokenizer.decode(reply) == digit
    return right


def test_a_fine_tuned_model_answers_held_out_questions_that_its_base_cannot(tmp_path):
    rng = random.Random(0)
    questions = list({q: d for q, d in (digit_question(rng) for _ in range(1000))}.items())
    held_out, trained = questions[:40], questions[40:]
    write_jsonl(tmp_path / "chats.jsonl", [{"messages": noisy_chat(q, rng) + [{"role": "assistant", "content": d}]}
                                           for q, d in trained])
    tok = get_tokenizer("byte")
    torch.manual_seed(0)
    # one layer: enough to attend to the digit and copy it, and the cheapest to train
    base = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=96, n_embd=64, n_layer=1, n_head=4, dropout=0.0))
    save_checkpoint(tmp_path / "base", base, tok)
    train(load_config(None, {"sft": str(tmp_path / "chats.jsonl"), "init_from": str(tmp_path / "base"),
                             "out_dir": str(tmp_path / "run"), "max_iters": 400, "lr": 3e-3, "eval_interval": 400,
                             "plot": False, "tensorboard": False}), progress=False, log=lambda line: None)
    chat = load_checkpoint(tmp_path / "run" / "best")
    fine_tuned = correct_answers(chat.model, chat.tokenizer, held_out, random.Random(1))
    # the base, given the very same prompt ids (the markers added to it as the trainer adds them)
    same_prompt = correct_answers(base, prepare_chat_model(base, tok), held_out, random.Random(1))
    # Measured: 40 of 40 against the base's 0. Broken on purpose, the fine-tuned model answered 2 of 40 with
    # the loss on every token (the mask off), and 0 of 40 when trained with another template than the
    # checkpoint's ("role: " instead of "role\n" after <|im_start|>).
    assert fine_tuned >= 30 and same_prompt <= 5, (fine_tuned, same_prompt)


@pytest.fixture(scope="module")
def char_base(tmp_path_factory) -> Path:
    tok = get_tokenizer("char", "abcdefghijklmnopqrstuvwxyz 0123456789.B\n")
    path = tmp_path_factory.mktemp("charbase") / "base"
    save_checkpoint(path, make_tiny_gpt(vocab_size=tok.vocab_size), tok)
    return path


@pytest.mark.parametrize("line, message", [
    (conversation("hi", "hello") | {"messages": [{"role": "tool", "content": "x"}]}, ":2: unknown role 'tool'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, ":2: the conversation has no assistant turn"),
    ("{not json", ":2: not a JSON line"),
    (conversation("what is {x}?", "{y}"), ":2: the base model's char tokenizer cannot encode it"),
])
def test_bad_conversations_stop_with_one_line_naming_the_line(tmp_path, work, char_base, capsys, line, message):
    base = char_base if "char" in message else work / "base"
    chats = write_jsonl(tmp_path / "chats.jsonl", [conversation("add 1 and 2", "3"), line])
    rc = main(["train", "--sft", str(chats), "--init-from", str(base), "--out_dir", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "\n" not in err and err.startswith("simplegpt train: error: ")
    assert f"{chats}{message}" in err
    assert not (tmp_path / "run").exists()  # nothing was trained: no run folder left behind


def test_a_char_base_that_encodes_the_file_is_refused_in_one_line_by_a_real_process(tmp_path, char_base):
    chats = write_jsonl(tmp_path / "chats.jsonl", [conversation("add 1 and 2", "3")] * 3)
    proc = subprocess.run([sys.executable, "-m", "simplegpt", "train", "--sft", str(chats), "--init-from",
                           str(char_base), "--out_dir", str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "char tokenizer cannot hold the chat markers" in proc.stderr


def test_sft_needs_a_base(capsys):
    assert main(["train", "--sft", "chats.jsonl", "--quiet"]) != 0
    assert "give the base with --init-from" in capsys.readouterr().err


def test_the_held_out_sampler_gives_each_conversation_once_then_nothing_to_count():
    from simplegpt.chat.sft_data import HeldOutSampler

    chats = [EncodedChat([1, 2, 3, 4][:n], [False, True, True, True][:n], f"c{n}") for n in (2, 3, 4)]
    sampler = HeldOutSampler(chats, block_size=8, batch_size=2, pad_id=0)
    batches = [sampler.next_batch() for _ in range(4)]
    assert [tuple(b[0].shape) for b in batches] == [(2, 2), (1, 3), (2, 1), (2, 1)]
    assert [CrossEntropy().tokens(b) for b in batches] == [1 + 2, 3, 0, 0]


def test_an_unreachable_hub_dataset_is_one_line(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        load_conversations("hf:no-such-owner/no-such-chats")
    message = str(e.value)
    assert "\n" not in message and "could not open the Hugging Face dataset 'no-such-owner/no-such-chats'" in message


def test_a_trained_bpe_base_holds_the_markers_and_fine_tunes(work, tmp_path):
    """A base prepared with --tokenizer bpe:N reserves the markers (no row added). Starting from it used
    to fail in the setup (its tokenizer kind 'bpe' is no tokenizer name the config accepts)."""
    from simplegpt.hf_tokenizer import train_bpe

    tok = train_bpe(["add one and two, which digit is in the string? " * 20], 300)
    save_checkpoint(tmp_path / "base", make_tiny_gpt(vocab_size=tok.vocab_size, n_positions=64), tok)
    result = train(load_config(None, {"sft": str(work / "chats.jsonl"), "init_from": str(tmp_path / "base"),
                                      "out_dir": str(tmp_path / "run"), "max_iters": 2, "eval_interval": 2,
                                      "plot": False, "tensorboard": False}), progress=False, log=lambda line: None)
    ck = load_checkpoint(result.out_dir / "last")
    assert ck.model.config.vocab_size == tok.vocab_size and ck.tokenizer.special_tokens["<|im_end|>"] == 2
    assert ck.tokenizer.chat_template and result.val_loss is not None


def test_tokens_per_second_counts_the_conversations_tokens_not_the_padding(work, tmp_path):
    cfg = load_config(None, {**settings(work), "out_dir": str(tmp_path / "run"), "max_iters": 3, "eval_interval": 3,
                             "log_interval": 1, "cpu_shards": 1, "plot": False, "tensorboard": False})
    lines: list[str] = []
    result = train(cfg, progress=False, log=lines.append)
    # the same batches again, from the run's sampler: the tokens under their attention masks
    ck = load_checkpoint(work / "base")
    sampler = load_sft(cfg, ck.model, ck.tokenizer).train
    real = [sum(int(sampler.next_batch()[2].sum()) for _ in range(cfg.grad_accum_steps)) for _ in range(3)]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in records if r["kind"] == "train"] == [sum(real[:i + 1]) for i in range(3)]
    assert result.tokens_seen == sum(real) < 3 * cfg.grad_accum_steps * cfg.batch_size * cfg.block_size
    assert any("count the conversations' tokens, not the padding" in line for line in lines)
