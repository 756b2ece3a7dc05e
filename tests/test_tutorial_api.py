"""The tutorial's API, as the tutorial uses it."""

import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import ROOT
from simplegpt import GPTBlock, GPTConfig, SimpleDataset, SimpleGPT, default_device, generate_text, get_tokenizer, train
from simplegpt.model import Block

TEXTS = ["Hello, how are you?", "I am fine, thank you.", "What about you?"]


def test_dataset_items():
    tok = get_tokenizer("gpt2")
    ds = SimpleDataset(TEXTS, tok, max_length=20)
    item = ds[0]
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    assert item["input_ids"].shape == (20,)
    assert item["attention_mask"].sum() == 6
    assert (item["labels"][6:] == -100).all() and (item["labels"][:6] == item["input_ids"][:6]).all()


def test_simplegpt_from_transformers_config_trains(capsys):
    transformers = pytest.importorskip("transformers", reason="the hf extra provides transformers")
    tok = get_tokenizer("gpt2")
    config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = SimpleGPT(config)
    assert model.config.n_embd == 32 and GPTBlock is Block
    loader = DataLoader(SimpleDataset(TEXTS, tok, max_length=12), batch_size=2, shuffle=True)
    losses = train(model, loader, torch.optim.Adam(model.parameters(), lr=3e-3), epochs=8, device="cpu")
    out = capsys.readouterr().out
    assert "Epoch 1/8, Loss: " in out and "Epoch 8/8, Loss: " in out
    assert losses[-1] < losses[0] - 2.0


def test_train_accepts_tutorial_tuples(capsys):
    tok = get_tokenizer("byte")
    model = SimpleGPT(GPTConfig(
        vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    ds = SimpleDataset(TEXTS, tok, max_length=24)
    pairs = [(ds[i]["input_ids"], ds[i]["attention_mask"]) for i in range(3)]
    loader = DataLoader(pairs, batch_size=2)
    losses = train(model, loader, torch.optim.Adam(model.parameters(), lr=1e-3), epochs=2, device="cpu")
    assert len(losses) == 2 and all(l > 0 for l in losses)


def test_default_device_without_cuda():
    expected = "cuda" if torch.cuda.is_available() else None
    assert default_device() in ("cuda", "mps", "cpu")
    if expected is None:
        assert default_device() != "cuda"


def test_generate_text_stops_at_eos():
    tok = get_tokenizer("byte")
    model = SimpleGPT(GPTConfig(
        vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    with torch.no_grad():  # make EOS the most likely next token everywhere
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[tok.eos_id, 0] = 5.0
    assert generate_text(model, tok, "Once", max_length=20, device="cpu") == "Once"


def test_tutorial_example_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "tutorial.py")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("Epoch 1/5, Loss: ") and lines[4].startswith("Epoch 5/5, Loss: ")
    assert float(lines[4].split("Loss: ")[1]) < float(lines[0].split("Loss: ")[1])
    assert lines[5].startswith("Once upon a time")
