import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from simplegpt.checkpoint import load_train_state
from simplegpt.data.shakespeare import shakespeare_documents
from simplegpt.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# tinyshakespeare.txt's size and its 65 characters, which the suite's corpus keeps.
TINYSHAKESPEARE_BYTES = 1_115_394
TINYSHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="session")
def shakespeare_path(tmp_path_factory) -> Path:
    """A stand-in for tinyshakespeare.txt made from the plays simplegpt ships, so the suite runs from
    the repository alone (the classic file is for bench/): plays as speeches, 1,115,394 bytes of
    ASCII in tinyshakespeare's 65 characters. The plays' few other characters are folded into
    those (an em dash to '-', '"' to "'") or dropped; the ones the slice lacks ('$', '3') end it."""
    text = "\n".join(shakespeare_documents())
    fold = {ord("\u2014"): "-", ord('"'): "'"}
    text = text.translate(fold | {ord(c): None for c in set(text) - set(TINYSHAKESPEARE_CHARS) if ord(c) not in fold})
    missing = "".join(sorted(set(TINYSHAKESPEARE_CHARS) - set(text[:TINYSHAKESPEARE_BYTES])))
    text = text[:TINYSHAKESPEARE_BYTES - len(missing)] + missing
    path = tmp_path_factory.mktemp("corpus") / "tinyshakespeare.txt"
    path.write_bytes(text.encode("ascii"))
    return path


def seed_style_config(**kw) -> SimpleNamespace:
    """A config with the transformers.GPT2Config field names the tutorial reads."""
    base = dict(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, layer_norm_epsilon=1e-5)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_tiny_gpt(seed: int = 0, scale: float | None = None, jitter: float | None = None, **overrides) -> GPT:
    """The suite's tiny random GPT (2 layers, 32 wide, 2 heads, vocabulary 50, window 32; any GPTConfig
    field can be overridden), made from torch.manual_seed(seed). With GPT-2's init an untrained model
    with tied embeddings mostly repeats its last token: scale multiplies every weight (8 makes the
    output depend on the whole context), jitter adds that much Gaussian noise (no zero biases or unit
    LayerNorm weights left, as after some training)."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2, dropout=0.0)
    model = GPT(GPTConfig(**{**fields, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if scale is not None:
                p.mul_(scale)
            if jitter is not None:
                p.add_(torch.randn_like(p) * jitter)
    return model


@pytest.fixture
def tiny_gpt():
    """make_tiny_gpt, for tests that take it as a fixture: tiny_gpt(n_layer=1, scale=8.0)."""
    return make_tiny_gpt


def uneven_texts(path: Path) -> Path:
    """A JSON-lines corpus of texts of 2 to 79 characters: with the char tokenizer, padded rows of 3 to 80
    tokens, so micro-batches of the same rows hold very different numbers of loss tokens."""
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in mind suffer".split()
    texts = [" ".join(rng.choice(words) for _ in range(40))[: rng.randint(2, 79)] for _ in range(60)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def first_step(run: Path) -> tuple[float, float, float, list[torch.Tensor]]:
    """The first step's loss, gradient norm, val loss and gradients (AdamW's first exp_avg is (1 - beta1) x the
    gradient)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    [train], [val] = ([r for r in records if r["kind"] == kind] for kind in ("train", "eval"))
    opt = load_train_state(run / "last")["optimizer"]
    beta1 = opt["param_groups"][0]["betas"][0]
    grads = [opt["state"][i]["exp_avg"] / (1 - beta1) for i in sorted(opt["state"])]
    return train["loss"], train["grad_norm"], val["val_loss"], grads


# 8 rows a step (and 8 val rows: eval_iters x batch_size), split into micro-batches in every way; grad_clip
# so large that it only measures the norm
SPLITS = [(8, 1), (4, 2), (2, 4), (1, 8)]
ONE_STEP = dict(batch_mode="padded", tokenizer="char", block_size=80, max_iters=1, eval_interval=1, sample_tokens=0,
                dropout=0.0, grad_clip=1e9)


def split(batch_size: int, accum: int) -> dict:
    """The settings of one SPLITS entry."""
    return dict(batch_size=batch_size, grad_accum_steps=accum, eval_iters=8 // batch_size)


def assert_same_steps(steps: list[tuple[float, float, float, list[torch.Tensor]]]) -> None:
    """Every first_step() of steps has the first one's loss, gradient norm, val loss and gradients, within 1e-6."""
    loss, norm, val, grads = steps[0]
    for other_loss, other_norm, other_val, other_grads in steps[1:]:
        assert abs(other_loss - loss) < 1e-6 and abs(other_norm - norm) < 1e-6 and abs(other_val - val) < 1e-6
        for g, h in zip(grads, other_grads, strict=True):
            torch.testing.assert_close(h, g, atol=1e-6, rtol=0)


def with_template(tokenizer, template: str):
    """The tokenizer carrying a chat template (rebuilt with `tokenizers` where it is not an HFTokenizer:
    the same ids for every text), as simplegpt.chat stores a checkpoint's template."""
    from simplegpt.hf_tokenizer import HFTokenizer, as_hf_tokenizer

    hf = as_hf_tokenizer(tokenizer)
    return HFTokenizer(hf.json, hf.eos_id, kind=hf.kind, chat_template=template)


@pytest.fixture
def small_disk(tmp_path):
    """mount(size, ro=False) -> a new tmpfs of that size (a real file system that fills up, or refuses writes)."""
    mounted = []

    def mount(size: str, ro: bool = False) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if ro else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the full-disk tests need one (root)")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def use_kernel_variant(name: str, monkeypatch) -> str:
    """Put the `name` build of the CPU kernels (lib.VARIANT_NAMES) in place of the one lib.load()
    chose, for the calling test only; skips where the kernels are unavailable or this CPU cannot run
    that build. Returns name."""
    from simplegpt.accel.cpu import decode, lib, training

    if lib.load() is None:
        pytest.skip(f"CPU kernels unavailable: {lib.unavailable_reason()}")
    missing = lib.missing_features(next(v for v in lib.VARIANTS if v.name == name))
    if missing:
        pytest.skip(f"this CPU cannot run the {name} kernels: it lacks {', '.join(missing)}")
    so = lib.build(name)
    monkeypatch.setattr(lib, "_lib", so)
    monkeypatch.setattr(decode, "_pool", 0)  # the swapped-in library starts its own pool
    if training._blas_ready():
        so.sg_set_sgemm(training._sgemm)
    assert lib.load() is so and so.sg_variant() == name.encode()
    return name
