"""Seeds: every 64-bit seed gives its own samples (CPU generators keep only 32 bits of torch's
manual_seed), row i of a batch samples as seed + i alone, and the server takes every 64-bit seed."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_gpt
from simplegpt import get_tokenizer, save_checkpoint
from simplegpt.engine import Engine, SamplingParams
from simplegpt.generation.sampling import SEED_MAX, SEED_MIN, seeded_generator

COLLIDING = [0, 2**32, 2**62, 2**63, 2**64 - 2**32]  # all 0 modulo 2^32


def draws(seed: int) -> list[int]:
    return torch.randint(0, 2**31, (8,), generator=seeded_generator(seed)).tolist()


def test_seeds_equal_modulo_2_to_the_32_give_different_streams():
    streams = [draws(s) for s in COLLIDING + [1, 2**32 + 1, 2**64 - 1]]
    assert len({tuple(s) for s in streams}) == len(streams)


def test_seeds_below_2_to_the_32_keep_torchs_streams():
    """Samples saved with a small seed before this change come out the same."""
    for seed in (0, 1, 1234, 2**32 - 1):
        assert draws(seed) == torch.randint(0, 2**31, (8,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_seeds_are_taken_modulo_2_to_the_64():
    assert draws(-1) == draws(2**64 - 1)
    assert draws(SEED_MIN) == draws(2**63)
    assert draws(2**40) == draws(2**40)


@pytest.fixture(scope="module")
def engine() -> Engine:
    tok = get_tokenizer("byte")
    return Engine(make_tiny_gpt(seed=0, scale=4.0, vocab_size=tok.vocab_size, n_positions=48), tok)


def sample(engine: Engine, prompts: list[str], seed: int) -> list[str]:
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=seed, stop_at_eos=False)
    return [r.text for r in engine.generate(prompts, params)]


def test_engine_samples_differ_for_seeds_equal_modulo_2_to_the_32(engine):
    texts = [sample(engine, ["A"], s)[0] for s in COLLIDING]
    assert len(set(texts)) == len(texts), texts


@pytest.mark.parametrize("seed", [5, 2**62, SEED_MAX - 1])
def test_row_i_samples_as_seed_plus_i_alone(engine, seed):
    """SEED_MAX - 1: rows 1 and 2 wrap to 2^64 - 1 and 0."""
    batched = sample(engine, ["A", "Bee", "C"], seed)
    alone = [sample(engine, [p], (seed + i) % 2**64)[0] for i, p in enumerate(["A", "Bee", "C"])]
    assert batched == alone


@pytest.mark.parametrize("seed", [SEED_MAX + 1, SEED_MIN - 1, 2**100, 1.5])
def test_seeds_outside_64_bits_are_refused(seed):
    with pytest.raises(ValueError, match="seed must be an integer from -2\\^63 to 2\\^64 - 1"):
        SamplingParams(seed=seed)


def test_server_takes_every_64_bit_seed_and_refuses_others(engine, tmp_path):
    """A real `simplegpt serve` process: 2^63 and 2^64 - 1 (its second row wrapping to 0) give the
    engine's samples; a seed past 64 bits is a 400 naming seed, as OpenAI's errors do."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    checkpoint = save_checkpoint(tmp_path / "ck", engine.model, engine.tokenizer)
    proc = subprocess.Popen([sys.executable, "-m", "simplegpt", "serve", "--checkpoint", str(checkpoint),
                             "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        found = re.search(r"http://127\.0\.0\.1:(\d+)", proc.stderr.readline())
        assert found, "no address in the server's first line"
        url = f"http://127.0.0.1:{found.group(1)}/v1/completions"
        for _ in range(200):
            try:
                httpx.get(url.replace("/v1/completions", "/health"), timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        body = dict(model="ck", prompt="A", max_tokens=24, temperature=1.0, ignore_eos=True)
        for seed in (2**63, SEED_MAX, SEED_MIN):
            r = httpx.post(url, json={**body, "seed": seed, "n": 2}, timeout=60)
            assert r.status_code == 200, r.text
            texts = [c["text"] for c in r.json()["choices"]]
            assert texts == [sample(engine, ["A"], (seed + i) % 2**64)[0] for i in range(2)]
        for seed in (SEED_MAX + 1, SEED_MIN - 1, 10**30):
            r = httpx.post(url, content=json.dumps({**body, "seed": seed}), timeout=60,
                           headers={"Content-Type": "application/json"})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == "seed" and "seed must be an integer" in error["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
