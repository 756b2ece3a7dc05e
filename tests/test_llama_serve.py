"""A Llama-style checkpoint (rotary, RMSNorm, SwiGLU, GQA, QK-norm, untied head) through `simplegpt serve`
and `simplegpt eval`, unchanged: the server's greedy completions are the engine's."""

import json

import openai
import pytest

from simplegpt import get_tokenizer, load_checkpoint, save_checkpoint
from simplegpt.cli import main
from simplegpt.engine import Engine, SamplingParams

from conftest import make_tiny_gpt
from test_llama import QWEN3
from test_server import start


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = get_tokenizer("byte")
    model = make_tiny_gpt(seed=0, scale=4.0, vocab_size=tok.vocab_size, n_positions=48, **QWEN3)
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "llama", model, tok)


def test_serve_gives_the_engines_completions(checkpoint):
    ck = load_checkpoint(checkpoint)
    want = [r.text for r in Engine(ck.model, ck.tokenizer).generate(
        ["ROMEO:", "To be, or not"], SamplingParams(max_new_tokens=60, temperature=0))]  # past the 48-token window
    proc, port = start(checkpoint)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model="llama", prompt=["ROMEO:", "To be, or not"], max_tokens=60,
                                        temperature=0)
        assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == want
        chunks = client.completions.create(model="llama", prompt="ROMEO:", max_tokens=60, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_eval_reads_the_checkpoint(checkpoint, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("To be, or not to be, that is the question. " * 8)
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "t.txt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
