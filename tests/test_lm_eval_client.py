"""lm-evaluation-harness's own API client (`lm_eval --model local-completions`) against a real
`simplegpt serve` process on 127.0.0.1 gives the same log-likelihoods as simplegpt's in-process
adapter (simplegpt/evaluation/lm_eval_harness.py), on a tiny character-level model, offline: the client
tokenizes through the server's /tokenize (its "remote" tokenizer backend) and scores through
/v1/completions with echo and logprobs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("lm_eval", reason='needs lm-evaluation-harness: pip install "simplegpt-toolkit[lmeval]"')
pytest.importorskip("fastapi")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import simplegpt.evaluation.lm_eval_harness  # noqa: E402  (registers the model "simplegpt")
from conftest import make_tiny_gpt  # noqa: E402
from simplegpt.checkpoint import save_checkpoint  # noqa: E402
from simplegpt.tokenizer import EOS_TEXT, CharTokenizer  # noqa: E402
from test_lm_eval import write_tasks  # noqa: E402
from test_server import start  # noqa: E402

CONTEXT = 48
DOCS = [
    {"question": "the cat sat on the", "choices": [" mat", " hat", " sea"], "answer": 0,
     "text": "to be or not to be"},
    {"question": "one two three", "choices": [" four", " five"], "answer": 1, "text": "all the world is a stage"},
    {"question": "", "choices": ["so", " no"], "answer": 0, "text": "now is the winter"},  # empty context
    {"question": "a b c", "choices": [" d", " e f g h i j"], "answer": 0, "text": "a"},
]
TASKS = {
    "tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
    "tiny_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                     "metric_list": [{"metric": "word_perplexity"}]},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval_client")
    text = "".join(d["question"] + "".join(d["choices"]) + d["text"] for d in DOCS)
    tok = CharTokenizer.from_text(text)
    model = make_tiny_gpt(seed=3, scale=6.0, vocab_size=tok.vocab_size, n_positions=CONTEXT)
    with torch.no_grad():  # the end-of-text token the likeliest at most positions (not all): the server's
        ln_f, wte = model.transformer.ln_f, model.transformer.wte.weight  # one generated token is then often EOS
        ln_f.bias.copy_(torch.randn(ln_f.bias.shape, generator=torch.Generator().manual_seed(0)))
        wte[tok.eos_id] = ln_f.bias / ln_f.bias.norm() ** 2 * 40
    save_checkpoint(root / "ck", model, tok)
    write_tasks(root, DOCS, TASKS)
    return root, tok


@pytest.fixture(scope="module")
def server(setup):
    root, _ = setup
    proc, port = start(root / "ck", "--model-name", "tiny")
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def scores(samples: dict) -> dict:
    """(task, doc, request index) -> the response (log-likelihood, greedy) or rolling log-likelihood."""
    out = {}
    for task, rows in samples.items():
        for s in rows:
            for j, resp in enumerate(s["resps"]):
                out[task, s["doc_id"], j] = resp[0]
    return out


def normal(resp) -> tuple[float, bool | None]:
    """A response as (log-likelihood, greedy or None): lm_eval keeps tuples in memory and writes
    lists (of strings, in some versions) to its samples file."""
    if isinstance(resp, (list, tuple)):
        return float(resp[0]), str(resp[1]).lower() in ("true", "1")
    return float(resp), None


def in_process(root: Path) -> dict:
    out = lm_eval.simple_evaluate(
        model=simplegpt.evaluation.lm_eval_harness.MODEL_NAME, model_args=f"checkpoint={root / 'ck'}",
        tasks=list(TASKS),
        device="cpu", batch_size=2, task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False),
        log_samples=True, bootstrap_iters=0)
    return scores(out["samples"])


def test_the_tokenizer_routes_follow_vllms_shapes(server, setup):
    _, tok = setup
    base = f"http://127.0.0.1:{server}"
    info = httpx.get(f"{base}/tokenizer_info").json()
    assert info["eos_token"] == EOS_TEXT and info["model_max_length"] == CONTEXT
    got = httpx.post(f"{base}/tokenize", json={"prompt": "the cat" + EOS_TEXT + "sat", "add_special_tokens": False})
    assert got.json()["tokens"] == tok.encode("the cat") + [tok.eos_id] + tok.encode("sat")
    back = httpx.post(f"{base}/detokenize", json={"tokens": tok.encode("a stage")})
    assert back.json() == {"prompt": "a stage"}
    back = httpx.post(f"{base}/detokenize", json={"tokens": got.json()["tokens"]})
    assert back.json() == {"prompt": "the cat" + EOS_TEXT + "sat"}  # /tokenize's ids back to its text
    bad = httpx.post(f"{base}/detokenize", json={"tokens": [tok.vocab_size]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    # a character the vocabulary lacks is a 400 naming it, not a server error (here and in a completion)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "zebra"}]}  # its template has a 'U'
    for path, body, param in (("/tokenize", {"prompt": "the zebra"}, "prompt"),
                              ("/v1/completions", {"model": "tiny", "prompt": "the zebra", "max_tokens": 1}, "prompt"),
                              ("/v1/chat/completions", chat, "messages")):
        bad = httpx.post(f"{base}{path}", json=body)
        assert bad.status_code == 400 and "not in the character vocabulary" in bad.json()["error"]["message"], bad.text
        assert bad.json()["error"]["param"] == param


def test_lm_evals_local_completions_client_scores_like_the_in_process_adapter(server, setup, tmp_path):
    """The client asks for one generated token with echo and drops the last logprob: a row that ends
    at the end-of-text token must still report it (this model draws it at most positions)."""
    root, _ = setup
    # the documented command (docs/serving.md), run as a user would, while the adapter scores in process
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
         f"model=tiny,base_url=http://127.0.0.1:{server}/v1/completions,max_length={CONTEXT + 1}",
         "--tasks", ",".join(TASKS), "--include_path", str(root / "tasks"), "--output_path", str(tmp_path / "out"),
         "--log_samples"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        want = in_process(root)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    samples = {}
    for path in Path(tmp_path / "out").rglob("samples_*.jsonl"):
        task = next(t for t in TASKS if f"samples_{t}_" in path.name)
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    got = scores(samples)
    assert set(got) == set(want) and len(want) == sum(len(d["choices"]) + 1 for d in DOCS)
    for key, value in want.items():
        (lp, greedy), (want_lp, want_greedy) = normal(got[key]), normal(value)
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy, key
