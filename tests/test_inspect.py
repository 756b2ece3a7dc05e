"""simplegpt inspect and simplegpt.learn: attention weights recorded from the plain model, next-token
bars, the self-contained page in a real browser, and one-line errors for bad input."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_gpt
from simplegpt.checkpoint import save_checkpoint
from simplegpt.learn import attention_weights, figures, inspect_text, token_labels
from simplegpt.learn.output import write_inspection
from simplegpt.model import CausalSelfAttention
from simplegpt.tokenizer import CharTokenizer

# 49 characters + EOS = the tiny model's vocabulary of 50
CHARS = "\n !',.:;?ABCDEFGHIKLMNOPRSTUabcdefghiklmnoprstuwy"
TEXT = "ROMEO: But soft, what light"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simplegpt", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inspect") / "ck"
    save_checkpoint(path, make_tiny_gpt(scale=8.0), CharTokenizer(CHARS))
    return path


def test_attention_weights_are_causal_rows_of_probabilities_from_the_model_itself():
    model = make_tiny_gpt(jitter=0.05, n_layer=3, n_head=4)  # weights far from saturated: none underflows to 0
    idx = torch.randint(0, 50, (2, 20))
    before = {name: (p, p.clone()) for name, p in model.named_parameters()}
    logits, weights = attention_weights(model, idx)
    assert weights.shape == (3, 2, 4, 20, 20)
    upper = torch.ones(20, 20, dtype=torch.bool).triu(1)
    assert (weights[..., upper] == 0).all()  # no position reads a later one
    assert torch.allclose(weights.sum(-1), torch.ones(3, 2, 4, 20), atol=1e-5)
    assert weights[..., ~upper].gt(0).all()  # and each may read every earlier one
    # the weights shown are the ones the model uses: the recording view gives the model's own logits
    torch.testing.assert_close(logits, model(idx)[0], atol=1e-5, rtol=1e-5)
    # the model itself is untouched: same classes, no recorded weights, same parameters
    assert all(type(b.attn) is CausalSelfAttention and not hasattr(b.attn, "weights") for b in model.transformer.h)
    assert all(p is q and torch.equal(p, saved) for (_, (p, saved)), (_, q)
               in zip(before.items(), model.named_parameters()))


def test_a_later_token_does_not_change_earlier_rows():
    model = make_tiny_gpt(scale=8.0)
    ids = torch.randint(0, 50, (1, 24))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 7) % 50
    _, a = attention_weights(model, ids)
    _, b = attention_weights(model, changed)
    torch.testing.assert_close(a[..., :12, :], b[..., :12, :], atol=1e-6, rtol=0)
    assert not torch.allclose(a[..., 12:, :], b[..., 12:, :], atol=1e-3)  # the later rows do see it


def test_padding_gets_no_attention():
    model = make_tiny_gpt(scale=8.0)
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 3:5] = 0
    _, w = attention_weights(model, torch.randint(0, 50, (1, 10)), attention_mask=mask)
    real = mask[0].bool()
    assert (w[..., real, :][..., 3:5] == 0).all()
    assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-5)


def test_next_token_bars_are_the_softmax_of_the_models_logits():
    model, tok = make_tiny_gpt(scale=8.0), CharTokenizer(CHARS)
    insp = inspect_text(model, tok, TEXT, top_k=7)
    ids = tok.encode(TEXT)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids]))[0][0], dim=-1)
    want = probs.topk(7, dim=-1)
    np.testing.assert_allclose(insp.top_probs, want.values.numpy(), rtol=1e-5, atol=1e-6)
    assert (insp.top_ids == want.indices.numpy()).all()
    assert insp.tokens[:6] == ["R", "O", "M", "E", "O", ":"] and insp.tokens[6] == "·"
    assert insp.top_tokens == [token_labels(tok, row) for row in want.indices.tolist()]
    assert insp.position_similarity.shape == (32, 32)
    np.testing.assert_allclose(np.diag(insp.position_similarity), 1.0, atol=1e-5)


def test_inspect_command_writes_pictures_arrays_and_a_page_that_opens_offline(checkpoint, tmp_path):
    out = tmp_path / "pictures"
    proc = cli("inspect", "--checkpoint", str(checkpoint), "--text", TEXT, "--out", str(out), "--html",
               "--top-k", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    T = len(TEXT)
    assert len(proc.stdout.splitlines()) == T + 1 and proc.stdout.splitlines()[0].split()[:2] == ["0", "R"]
    assert sorted(p.name for p in out.iterdir()) == ["attention_layer0.png", "attention_layer1.png", "inspect.html",
                                                     "inspect.npz", "next_tokens.png", "positions.png"]
    saved = np.load(out / "inspect.npz")
    att = saved["attention"]
    assert att.shape == (2, 2, T, T)
    assert (att[..., np.triu(np.ones((T, T), bool), 1)] == 0).all()
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
    model = make_tiny_gpt(scale=8.0)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([CharTokenizer(CHARS).encode(TEXT)]))[0][0], dim=-1)
    np.testing.assert_allclose(saved["top_probs"], probs.topk(3, dim=-1).values.numpy(), rtol=1e-5, atol=1e-6)

    widths, text, outside = open_in_browser(out / "inspect.html", tmp_path / "inspect.png")
    assert len(widths) == 4 and all(w > 0 for w in widths)  # 2 attention layers, next tokens, positions
    assert "layer 1" in text.lower() and TEXT in text
    assert outside == []
    assert (tmp_path / "inspect.png").stat().st_size > 10_000


@pytest.mark.parametrize("case", ["too_long", "outside_vocabulary", "no_tokenizer"])
def test_bad_input_is_one_line_and_exit_1(checkpoint, tmp_path, case):
    ck, text = checkpoint, {"too_long": "a" * 33, "outside_vocabulary": "ROMEO: Zounds"}.get(case, TEXT)  # no 'Z'
    if case == "no_tokenizer":
        ck = tmp_path / "bare"
        save_checkpoint(ck, make_tiny_gpt())
    proc = cli("inspect", "--checkpoint", str(ck), "--text", text, "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("simplegpt inspect: error: ")
    assert {"too_long": "33 tokens long, longer than the model's context of 32 tokens",
            "outside_vocabulary": "character 'Z'", "no_tokenizer": "has no tokenizer"}[case] in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [(["--text", ""], "the text is empty"),
                                           (["--text", TEXT, "--top-k", "0"], "--top-k must be at least 1")])
def test_more_bad_input_through_the_cli_entry_point(checkpoint, tmp_path, capsys, args, message):
    from simplegpt.cli import main

    assert main(["inspect", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"), *args]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("simplegpt inspect: error: ") and message in line


def open_in_browser(page_file: Path, screenshot: Path) -> tuple[list[int], str, list[str]]:
    """Open a local HTML file in headless Chromium with the network off; return each image's
    naturalWidth (0 = did not load), the page's text and any request that left the file (none should).
    Saves a full-page screenshot. Skips where there is no Chromium or playwright (fails in CI)."""
    browser_path = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_path = None
    if browser_path is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI needs Chromium and playwright for the page tests (see .ci/run)")
        pytest.skip("no Chromium or playwright here: apt-get install chromium; pip install playwright")
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_context(offline=True).new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_file.resolve().as_uri(), wait_until="load")
            widths = page.evaluate("Array.from(document.images, i => i.complete ? i.naturalWidth : 0)")
            text = page.inner_text("body")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return widths, text, [u for u in requests if not u.startswith(("file:", "data:"))]


def test_labels_make_spaces_newlines_eos_and_partial_characters_visible():
    from simplegpt.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    assert token_labels(tok, tok.encode("é a\n\t") + [tok.eos_id]) == ["<C3>", "<A9>", "·", "a", "\\n", "\\t", "<eos>"]


def test_next_token_bars_leave_out_ids_past_the_tokenizer():
    # an imported model's embedding is often padded past its tokenizer (Qwen3's): those ids have no text,
    # and the engine never draws them, so the bars are the softmax over the tokenizer's ids
    tok = CharTokenizer(CHARS)
    model = make_tiny_gpt(scale=8.0, vocab_size=tok.vocab_size + 14, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight[tok.vocab_size:] = 5.0  # the padded ids are the most likely
    insp = inspect_text(model, tok, TEXT, top_k=7)
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode(TEXT)]))[0][0]
    want = torch.softmax(logits[:, :tok.vocab_size], dim=-1).topk(7, dim=-1)
    assert (insp.top_ids == want.indices.numpy()).all() and insp.top_ids.max() < tok.vocab_size
    np.testing.assert_allclose(insp.top_probs, want.values.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_the_positions_picture_says_what_its_similarity_is_of(tmp_path, positions):
    tok = CharTokenizer("abcdefgh ")
    model = make_tiny_gpt(vocab_size=tok.vocab_size, positions=positions)
    insp = inspect_text(model, tok, "abc def")
    assert insp.positions == positions
    write_inspection(insp, tmp_path, with_html=True)
    page = (tmp_path / "inspect.html").read_text()
    # a rotary model has no position embeddings: the page and the picture speak of its rotations
    assert ("Rotary positions" in page) == (positions == "rotary")
    assert ("Position embeddings" in page) == (positions == "learned")
    title = figures.position_figure(insp.position_similarity, insp.positions).axes[0].get_title()
    assert ("rotations" in title) == (positions == "rotary")
