"""lm-evaluation-harness adapter: a tiny local task run through lm_eval, scored like Hugging Face would.

The reference is computed independently: the exported Hugging Face model and its AutoTokenizer.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason='the lm_eval adapter needs the optional extra: pip install "simplegpt-toolkit[lmeval]"')
transformers = pytest.importorskip("transformers", reason="the reference scores come from the 'hf' extra")

import lm_eval  # noqa: E402
from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from simplegpt import GPT, GPTConfig  # noqa: E402
from simplegpt.checkpoint import save_checkpoint  # noqa: E402
from simplegpt.hf import export_hf  # noqa: E402
from simplegpt.evaluation.lm_eval_harness import SimpleGPTLM  # noqa: E402
from simplegpt.tokenizer import GPT2Tokenizer  # noqa: E402

CONTEXT = 24
DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " London", " Rome"], "answer": 0,
     "target": "Paris", "text": "To be, or not to be, that is the question."},
    {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0, "target": "four",
     "text": "All the world's a stage, and all the men and women merely players; they have their exits "
             "and their entrances, and one man in his time plays many parts, his acts being seven ages. "
             "At first the infant, mewling and puking in the nurse's arms."},
    {"question": "", "choices": ["blue", " green"], "answer": 1, "target": "blue",
     "text": "Now is the winter of our discontent made glorious summer by this sun of York."},
]
TASKS = {
    "tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
    "tiny_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                     "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]},
    "tiny_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{target}}",
                 "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False},
                 "metric_list": [{"metric": "exact_match"}]},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=4))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(root / "ck", model, GPT2Tokenizer())
    export_hf(root / "ck", root / "hf")
    write_tasks(root, DOCS, TASKS)
    return root


def write_tasks(root: Path, docs: list[dict], tasks: dict[str, dict]) -> None:
    """root/tiny.jsonl holding docs, and root/tasks/NAME.yaml for each task reading it (JSON is valid
    YAML, and lm_eval reads task files as YAML)."""
    data = root / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (root / "tasks").mkdir()
    for name, spec in tasks.items():
        doc = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
               "test_split": "test", **spec}
        (root / "tasks" / f"{name}.yaml").write_text(json.dumps(doc, indent=1), encoding="utf-8")


@pytest.fixture(scope="module")
def reference(setup):
    hf = transformers.GPT2LMHeadModel.from_pretrained(setup / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(setup / "hf")
    return hf, tok


def hf_logprob(hf, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) from the Hugging Face model, on the last CONTEXT tokens."""
    seq = (context + continuation)[-(CONTEXT + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([seq[:-1]])).logits[0], -1)
    n = len(continuation)
    picked = logp[-n:].gather(1, torch.tensor(continuation)[:, None])
    return picked.sum().item(), bool((logp[-n:].argmax(-1) == torch.tensor(continuation)).all())


def split(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm_eval's rule for causal models: trailing spaces go with the continuation, encode together."""
    if not context:
        return [tok.eos_token_id], tok(continuation)["input_ids"]
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok(context + continuation)["input_ids"], tok(context)["input_ids"]
    return ctx, whole[len(ctx):]


def test_simple_evaluate_scores_like_hugging_face(setup, reference):
    hf, tok = reference
    out = lm_eval.simple_evaluate(
        model="simplegpt", model_args=f"checkpoint={setup / 'ck'}", tasks=list(TASKS), device="cpu",
        batch_size=2, task_manager=TaskManager(include_path=str(setup / "tasks"), include_defaults=False),
        log_samples=True, bootstrap_iters=0)
    assert set(out["results"]) == set(TASKS)
    assert "acc,none" in out["results"]["tiny_mc"] and "bits_per_byte,none" in out["results"]["tiny_rolling"]
    # multiple choice: every (context, choice) log-likelihood and greedy flag
    checked = 0
    for sample in out["samples"]["tiny_mc"]:
        for (context, continuation), [(lp, greedy)] in zip(sample["arguments"], sample["resps"]):
            want_lp, want_greedy = hf_logprob(hf, *split(tok, context, continuation))
            assert abs(lp - want_lp) < 1e-4 and greedy == want_greedy
            checked += 1
    assert checked == sum(len(d["choices"]) for d in DOCS)
    # rolling: lm_eval's disjoint windows over the whole text; one text is longer than the context
    assert max(len(tok(d["text"])["input_ids"]) for d in DOCS) > 2 * CONTEXT
    for sample in out["samples"]["tiny_rolling"]:
        (text,) = sample["arguments"][0]
        windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
            token_list=tok(text)["input_ids"], prefix_token=tok.eos_token_id, max_seq_len=CONTEXT, context_len=1)]
        want = sum(hf_logprob(hf, c, t)[0] for c, t in windows)
        assert abs(sample["resps"][0][0] - want) < 1e-3
    # generation: greedy, as Hugging Face's generate
    for sample in out["samples"]["tiny_gen"]:
        context, kwargs = sample["arguments"][0]
        ids = tok(context)["input_ids"] or [tok.eos_token_id]
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=kwargs["max_gen_toks"], do_sample=False,
                              pad_token_id=tok.eos_token_id)
        want = tok.decode(gen[0, len(ids):].tolist(), skip_special_tokens=True).split("\n\n")[0]
        assert sample["resps"][0][0] == want


def test_generation_stops_before_the_first_stop_string(setup):
    lm = SimpleGPTLM(checkpoint=str(setup / "ck"), device="cpu")

    class Req:
        def __init__(self, *args):
            self.args = args

    full = lm.generate_until([Req("Once upon a time", {"until": [], "max_gen_toks": 12})])[0]
    assert len(full) > 4
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = lm.generate_until([Req("Once upon a time", {"until": [stop], "max_gen_toks": 12})])[0]
    assert cut == full[:full.index(stop)]
    # sampling goes through the engine, seeded: the same request gives the same text
    sampled = {"do_sample": True, "temperature": 0.9, "max_gen_toks": 8}
    one = lm.generate_until([Req("Once", sampled)])
    assert one == lm.generate_until([Req("Once", sampled)]) and one != lm.generate_until([Req("Once", {"max_gen_toks": 8})])


def test_repeated_sampled_requests_each_get_their_own_seed(setup):
    """Row k of every batch was seeded 1234 + k, so 12 repeats of one context at batch size 4 gave 4
    samples 3 times each. Request i is seeded seed + i, whatever the batch size and the other requests."""
    from simplegpt.engine import SamplingParams

    class Req:
        def __init__(self, *args):
            self.args = args

    sampled = {"do_sample": True, "temperature": 1.0, "max_gen_toks": 8}
    greedy = {"max_gen_toks": 8}
    requests = [Req("Once upon a time", sampled) for _ in range(12)]
    mixed = requests[:5] + [Req("Once upon a time", greedy)] + requests[5:]  # positions 6.. shift by one
    lm = SimpleGPTLM(checkpoint=str(setup / "ck"), device="cpu", batch_size=4, seed=77)
    out = lm.generate_until(requests)
    assert len(set(out)) == 12
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=77 + 3)
    [alone] = lm.engine.generate([lm.tok_encode("Once upon a time")], params)
    assert out[3] == alone.text
    for batch_size in (1, 5):
        assert SimpleGPTLM(checkpoint=str(setup / "ck"), device="cpu", batch_size=batch_size,
                           seed=77).generate_until(requests) == out
    got = lm.generate_until(mixed)
    assert got[:5] == out[:5] and got[6:7] != out[5:6] and len(set(got)) == 13
    assert SimpleGPTLM(checkpoint=str(setup / "ck"), device="cpu", batch_size=1, seed=77).generate_until(mixed) == got


def test_documented_command_line(setup, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "simplegpt.evaluation.lm_eval_harness", "run", "--model", "simplegpt",
         "--model_args", f"checkpoint={setup / 'ck'}", "--tasks", "tiny_mc", "--include_path",
         str(setup / "tasks"), "--output_path", str(tmp_path / "out"), "--batch_size", "2"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = list(Path(tmp_path / "out").rglob("results_*.json"))
    assert len(results) == 1
    assert "acc,none" in json.loads(results[0].read_text())["results"]["tiny_mc"]
