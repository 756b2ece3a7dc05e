"""A model whose embedding is padded past its tokenizer (an imported Qwen3: 151936 rows for 151669
tokens) through a real `simplegpt serve`: the scheduler draws only ids that have a token, as the
engine's own loop does, so no row ends in an id with no text."""

import openai
import pytest
import torch

from simplegpt import get_tokenizer, load_checkpoint, save_checkpoint
from simplegpt.engine import Engine, SamplingParams

from conftest import make_tiny_gpt
from test_llama import QWEN3
from test_server import start

PAD = 64  # embedding rows past the tokenizer's 257 tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = get_tokenizer("byte")
    model = make_tiny_gpt(seed=0, scale=4.0, vocab_size=tok.vocab_size + PAD, n_positions=48,
                          **dict(QWEN3, tie_word_embeddings=False))
    with torch.no_grad():  # the rows with no token win every argmax unless they are left out
        model.lm_head.weight[tok.vocab_size:] *= 50.0
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "padded", model, tok)


def test_the_server_draws_only_ids_the_tokenizer_has(checkpoint):
    ck = load_checkpoint(checkpoint)
    with torch.no_grad():
        logits = ck.model(torch.tensor([ck.tokenizer.encode("ROMEO:")]))[0][0, -1]
    assert logits.argmax() >= ck.tokenizer.vocab_size  # without the limit, greedy picks an id with no text
    prompts = ["ROMEO:", "To be, or not"]
    engine = Engine(ck.model, ck.tokenizer)
    greedy = [r.text for r in engine.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0))]
    penalised = [r.text for r in engine.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0,
                                                                         repetition_penalty=1.3))]
    proc, port = start(checkpoint)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model="padded", prompt=prompts, max_tokens=20, temperature=0)
        assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == greedy
        out = client.completions.create(model="padded", prompt=prompts, max_tokens=20, temperature=0,
                                        extra_body={"repetition_penalty": 1.3})
        assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == penalised
        sampled = client.completions.create(model="padded", prompt="ROMEO:", max_tokens=20, temperature=1.0, seed=3)
        assert sampled.choices[0].finish_reason == "length"  # 20 tokens drawn, each with its text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_prompt_of_ids_past_the_tokens_takes_a_repetition_penalty(checkpoint):
    """Prompt ids are checked against the embedding, so a prompt may hold a padded id; the penalty's
    record of seen tokens covers only ids that can be drawn."""
    ck = load_checkpoint(checkpoint)
    params = SamplingParams(max_new_tokens=5, temperature=0, repetition_penalty=1.3)
    [result] = Engine(ck.model, ck.tokenizer).generate([[82, 79, 300]], params)
    assert len(result.token_ids) == 5 and max(result.token_ids) < ck.tokenizer.vocab_size
