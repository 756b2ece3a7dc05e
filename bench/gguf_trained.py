"""The trained checkpoints of bench/gguf_parity.py and tests/test_gguf_llamacpp.py: made in seconds
by simplegpt's own trainer from synthetic data (sums, counts and short sentences; chats asking for
them), and from the quick start's embedded plays, so that their greedy tokens are decided by clear
margins, not the near ties of random models."""

from __future__ import annotations

import json
import random
from pathlib import Path

from simplegpt.model import LLAMA

NAMES = ("anna", "bob", "carl", "dora", "emil", "fay", "gus", "hana")
THINGS = ("apple", "book", "cup", "lamp", "rose", "coin")
# Tiny Llama-style and GPT-2 shapes; the Llama one has GQA and an untied head, as STYLES["llama"]
TRAINED_SHAPE = dict(n_layer=2, n_head=2, n_embd=64, block_size=128)
TRAINED_STYLES = {"gpt2": {}, "llama": dict(LLAMA, n_kv_head=1, tie_word_embeddings=False)}
# (label, what it is): the rows of the trained checkpoints in the bench, keys of trained_checkpoints()
TRAINED = {
    "bpe:512 (gpt2, trained)": "GPT-2 with a trained BPE, pretrained on the synthetic corpus",
    "bpe:512 (llama, trained)": "Llama-style with a trained BPE, pretrained on the synthetic corpus",
    "chat (llama, sft)": "that Llama-style base fine-tuned with train --sft on synthetic chats (ChatML template)",
    "char (plays)": "the quick start's character model (simplegpt train: the embedded plays), briefly trained",
    "byte (plays)": "the quick start with --tokenizer byte, briefly trained",
}


def _count(a: int, b: int) -> str:
    return ", ".join(str(i) for i in range(a, b + 1)) + "."


def synthetic_corpus(seed: int = 0, lines: int = 3000) -> str:
    """A small text of sums, counts and sentences about a few names and things."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        a, b, n, t = rng.randint(0, 9), rng.randint(0, 9), rng.choice(NAMES), rng.choice(THINGS)
        start = rng.randint(1, 30)
        out.append(rng.choice([f"{n} has {a} apples and {b} pears, so {n} has {a + b} fruits.",
                               f"the {t} of {n} is on the table.", f"add {a} and {b}: {a + b}.",
                               f"count from {start}: {_count(start, start + rng.randint(5, 20))}"]))
    return "\n".join(out) + "\n"


def synthetic_chats(seed: int = 1, n: int = 400) -> list[dict]:
    """Conversations (simplegpt's JSONL records) asking for sums, counts and whose a thing is."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        a, b, start = rng.randint(0, 9), rng.randint(0, 9), rng.randint(1, 30)
        end = start + rng.randint(10, 25)
        question, answer = rng.choice([
            (f"add {a} and {b}", f"{a} and {b} make {a + b}."),
            (f"count from {start} to {end}", _count(start, end)),
            (f"who has the {rng.choice(THINGS)}?", f"{rng.choice(NAMES)} has it.")])
        chats.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question},
                                   {"role": "assistant", "content": answer}]})
    return chats


def _train(settings: dict) -> Path:
    """The last checkpoint of a quiet simplegpt training run of these settings (config keys)."""
    from simplegpt.config import load_config
    from simplegpt.training.loop import train

    base = {"lr": 3e-3, "warmup_iters": 10, "eval_interval": 10_000, "eval_iters": 2, "sample_tokens": 0,
            "plot": False, "tensorboard": False, "seed": 0}
    result = train(load_config(None, {**base, **settings}), progress=False, log=lambda line: None)
    return Path(result.out_dir) / "last"


def trained_checkpoints(folder: Path, steps: int = 150) -> dict[str, Path]:
    """The checkpoints of TRAINED (label -> its last checkpoint), trained in folder: the synthetic
    corpus with a BPE of up to 512 tokens trained on it, pretrained on GPT-2 and on the Llama-style
    block (TRAINED_SHAPE) for `steps` steps; the Llama-style base fine-tuned `steps` steps with train
    --sft on synthetic_chats (the markers and the ChatML template join its tokenizer); and the quick
    start's data and tokenizer (data=shakespeare, the embedded plays, prepared as `simplegpt train`
    prepares them) with the character and with the byte tokenizer, on the same small shape, 40 steps."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text(synthetic_corpus(), encoding="utf-8")
    (folder / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in synthetic_chats()), encoding="utf-8")
    made = {}
    for style, options in TRAINED_STYLES.items():
        made[f"bpe:512 ({style}, trained)"] = _train({
            "data": str(folder / "corpus.txt"), "data_dir": str(folder / "data-bpe"), "tokenizer": "bpe:512",
            "out_dir": str(folder / f"base-{style}"), "batch_size": 16, "max_iters": steps, **TRAINED_SHAPE,
            **options})
    made["chat (llama, sft)"] = _train({
        "sft": str(folder / "chats.jsonl"), "init_from": str(made["bpe:512 (llama, trained)"]),
        "out_dir": str(folder / "chat"), "batch_size": 16, "max_iters": steps})
    for tokenizer in ("char", "byte"):
        made[f"{tokenizer} (plays)"] = _train({
            "data": "shakespeare", "tokenizer": tokenizer, "data_dir": str(folder / f"plays-{tokenizer}-data"),
            "out_dir": str(folder / f"plays-{tokenizer}"), "batch_size": 16, "max_iters": 40, **TRAINED_SHAPE})
    return made
