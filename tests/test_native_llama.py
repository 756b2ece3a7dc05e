"""The CPU kernels of Llama-style blocks (accel/cpu/llama_ops) applied from outside: the training twin
(accel.cpu.for_training) and the native decode backend run RMSNorm, rotary positions, SwiGLU/ReLU^2
and grouped-query attention on the kernels, with PyTorch's results. A decode step runs all the
blocks in one C call (decode.LlamaDecodeBlocks, csrc/llama_decode.c): its logits are the uncached
forward's, for every option, left-padded batches, past the context, int8, and on each build this
CPU can run (the avx2 one forced by SIMPLEGPT_CPU_KERNELS too)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simplegpt.accel import cpu
from simplegpt.accel.cpu import decode, lib, llama_ops
from simplegpt.engine import Engine, SamplingParams
from simplegpt.generation.native import NativeBatch
from simplegpt.quantize import quantize_int8
from simplegpt.training.loop import train

from conftest import make_tiny_gpt, use_kernel_variant
from test_engine import PROMPTS, reference_greedy
from test_llama import COMBOS, LLAMA, NANOCHAT, QWEN3, corpus, run_config, tiny  # noqa: F401 (corpus: a fixture)

if cpu.load() is None and os.environ.get("CI"):
    raise RuntimeError(f"the native kernels must build in CI: {cpu.unavailable_reason()}")
pytestmark = pytest.mark.skipif(cpu.load() is None, reason=f"native kernels unavailable: {cpu.unavailable_reason()}")

KERNELS = ("rms_norm", "rope", "swiglu", "relu2", "causal_attention", "qkv_attention", "swiglu_fused")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def calls(monkeypatch):
    """Counts of the llama_ops kernels called (by name), of decode.attention_step ("attention_step") and
    of the one-call decode step (decode.LlamaDecodeBlocks, "llama_blocks")."""
    counts: dict[str, int] = {}

    def spy(module, name):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)

    for name in KERNELS:
        spy(llama_ops, name)
    spy(decode, "attention_step")
    real_blocks = decode.LlamaDecodeBlocks.__call__

    def blocks(self, *args, **kwargs):
        counts["llama_blocks"] = counts.get("llama_blocks", 0) + 1
        return real_blocks(self, *args, **kwargs)
    monkeypatch.setattr(decode.LlamaDecodeBlocks, "__call__", blocks)
    return counts


@pytest.mark.parametrize("path", ["whole_model", "ops"])
@pytest.mark.parametrize("name", ["llama", "qwen3", "nanochat"])
def test_training_twin_runs_the_kernels_with_float64_gradients(name, path, calls, monkeypatch):
    """The twin's loss and gradients against a float64 model, through the whole-model pass
    (llama_model, one C call each way) and through the op kernels it falls back to."""
    from simplegpt.accel.cpu import llama_model
    if path == "ops":
        monkeypatch.setattr(llama_model, "usable", lambda *a: False)
    real_loss = llama_model.loss

    def whole(*args):
        calls["whole_model"] = calls.get("whole_model", 0) + 1
        return real_loss(*args)
    monkeypatch.setattr(llama_model, "loss", whole)
    options = dict(COMBOS[name], head_size=16) if name == "qwen3" else COMBOS[name]
    model = make_tiny_gpt(1, None, 0.05, vocab_size=61, n_positions=16, n_head=4, **options)
    idx, targets = torch.randint(0, 61, (3, 12)), torch.randint(0, 61, (3, 12))
    reference = make_tiny_gpt(1, None, 0.05, vocab_size=61, n_positions=16, n_head=4, **options).double()
    want = reference.loss(idx, targets)
    want.backward()
    with cpu.disabled():
        model.loss(idx, targets).backward()
    torch_grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    twin = cpu.for_training(model)
    twin.train()
    loss = twin.loss(idx, targets)
    loss.backward()
    if path == "whole_model":
        assert calls == {"whole_model": 1}, calls
    else:  # QK-norm, rotary positions and attention as one node from c_attn's output; SwiGLU from c_fc's
        used = {"rms_norm", "qkv_attention", "relu2" if options["mlp"] == "relu2" else "swiglu_fused"}
        assert used <= set(calls) and "whole_model" not in calls, calls
    assert float(loss.detach()) == pytest.approx(float(want.detach()), abs=1e-5)
    for (n, p), (_, ref) in zip(model.named_parameters(), reference.named_parameters()):
        # within 4x the error of PyTorch's own fp32 ops
        allowed = 4 * (torch_grads[n].double() - ref.grad).abs().max() + 1e-7
        assert (p.grad.double() - ref.grad).abs().max() <= allowed, n


@pytest.mark.parametrize("name", ["llama", "nanochat"])
def test_training_with_kernels_gives_the_losses_of_pytorch_and_resumes_bit_exactly(tmp_path, corpus, name, calls):
    options = dict(COMBOS[name], dropout=0.0)
    cfg = run_config(tmp_path, corpus, options, out_dir=str(tmp_path / "native"), n_head=2)
    native = train(cfg, progress=False)
    assert {"rms_norm", "qkv_attention"} <= set(calls)
    with cpu.disabled():
        plain = train(run_config(tmp_path, corpus, options, out_dir=str(tmp_path / "plain"), n_head=2),
                      progress=False)
    assert len(native.losses) == len(plain.losses)
    for a, b in zip(native.losses, plain.losses):
        assert a == pytest.approx(b, abs=1e-4)
    part = run_config(tmp_path, corpus, options, out_dir=str(tmp_path / "part"), n_head=2)
    first = train(part, stop_at=3, progress=False)
    resumed = train(part, resume=tmp_path / "part" / "last", progress=False)
    assert first.losses + resumed.losses == native.losses


@pytest.mark.parametrize("name", ["llama", "qwen3", "nanochat"])
def test_native_decode_runs_the_kernels_and_gives_the_eager_and_uncached_tokens(name, calls):
    model = tiny(COMBOS[name])
    params = SamplingParams(max_new_tokens=24, temperature=0.0, stop_at_eos=False)
    engine = Engine(model, window_shift=5)
    assert engine.backend.name == "native"
    tokens = [r.token_ids for r in engine.generate(PROMPTS, params)]
    # decode steps in one C call (issue 23), prefills on the single ops
    assert calls.get("llama_blocks", 0) > 0 and calls.get("rms_norm", 0) > 0 and calls.get("rope", 0) > 0
    assert calls.get("relu2" if COMBOS[name]["mlp"] == "relu2" else "swiglu_fused", 0) > 0
    with cpu.disabled():
        eager = Engine(model, window_shift=5)
        assert eager.backend.name == "eager"
        assert [r.token_ids for r in eager.generate(PROMPTS, params)] == tokens
    uncached = Engine(model, use_cache=False, window_shift=5)
    assert [r.token_ids for r in uncached.generate(PROMPTS, params)] == tokens
    assert tokens == [reference_greedy(model, p, 24, 5) for p in PROMPTS]


def test_native_int8_decode_of_a_gqa_model_runs_the_c_step_and_each_row_as_alone(calls):
    model = tiny(dict(QWEN3, head_size=16), n_positions=64, scale=None, jitter=None)
    quantize_int8(model)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    engine = Engine(model)
    batch = [r.token_ids for r in engine.generate(PROMPTS, params)]
    assert calls.get("llama_blocks", 0) > 0
    assert batch == [engine.generate([p], params)[0].token_ids for p in PROMPTS]



# The options the one-call step takes, each beside the others: GQA of 2 query heads a key/value head,
# QK-norm with a head wider than n_embd / n_head, tied and untied heads, SwiGLU, ReLU^2 and GELU,
# RMSNorm with and without a gain, LayerNorm with rotary positions, learned positions, biases.
STEP_OPTIONS = {
    "llama-gqa-tied": dict(LLAMA, n_head=4, n_kv_head=2),
    "qwen3-qknorm-untied": QWEN3,
    "nanochat-relu2-nogain": NANOCHAT,
    "learned-rmsnorm-relu2": COMBOS["learned-rmsnorm-relu2"],
    "learned-swiglu-gqa-bias-qknorm": COMBOS["learned-swiglu-gqa-bias-qknorm"],
    "rotary-layernorm-gelu-untied": dict(positions="rotary", tie_word_embeddings=False, n_kv_head=1),
}


def decode_against_uncached(model, monkeypatch, prompts=PROMPTS, new_tokens=24, shift=5) -> tuple[int, int]:
    """Greedy decoding of the left-padded batch `prompts` past the window (16): the logits of every
    step (prefills and decode steps alike) equal the uncached forward of each row's context, and the
    tokens the uncached reference loop's. Returns (decode steps, LlamaDecodeBlocks calls)."""
    steps, c_calls = [], []
    real_next, real_decode = NativeBatch.next_logits, NativeBatch.decode_step
    real_blocks = decode.LlamaDecodeBlocks.__call__

    def next_logits(self, rows, active, still):
        logits = real_next(self, rows, active, still)
        steps.append([(rows[i].tokens[rows[i].start:], logits[j].clone()) for j, i in enumerate(still)])
        return logits
    monkeypatch.setattr(NativeBatch, "next_logits", next_logits)
    decodes = []
    monkeypatch.setattr(NativeBatch, "decode_step", lambda self, last: decodes.append(1) or real_decode(self, last))
    monkeypatch.setattr(decode.LlamaDecodeBlocks, "__call__", lambda *a, **k: c_calls.append(1) or real_blocks(*a, **k))
    engine = Engine(model, window_shift=shift)
    assert engine.backend.name == "native" and engine.backend.blocks is not None
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    tokens = [r.token_ids for r in engine.generate(prompts, params)]
    with torch.no_grad():
        for step in steps:
            for context, got in step:
                want = model(torch.tensor([context]))[0][0, -1]
                assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max())), context
    assert tokens == [reference_greedy(model, p, new_tokens, shift) for p in prompts]
    return len(decodes), len(c_calls)


@pytest.mark.parametrize("name", list(STEP_OPTIONS))
def test_each_decode_step_is_one_c_call_with_the_uncached_logits(name, monkeypatch):
    model = tiny(STEP_OPTIONS[name])
    n_decodes, n_calls = decode_against_uncached(model, monkeypatch)
    assert n_decodes > 0 and n_calls == n_decodes  # every decode step ran in the C call


def test_a_layernorm_without_gain_decodes_on_the_single_ops(monkeypatch):
    """The C step has no LayerNorm without a gain: such a model's steps run the view's forward."""
    model = tiny(COMBOS["rotary-layernorm-nogain-untied"])
    engine = Engine(model, window_shift=5)
    assert engine.backend.name == "native" and engine.backend.blocks is None
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    assert [r.token_ids for r in engine.generate(PROMPTS, params)] == [reference_greedy(model, p, 8, 5) for p in PROMPTS]


def test_int8_decode_steps_are_one_c_call_near_fp32_and_each_row_as_alone(monkeypatch):
    fp32 = tiny(dict(QWEN3, n_head=4, n_kv_head=2), n_positions=64, scale=None, jitter=None)
    model = tiny(dict(QWEN3, n_head=4, n_kv_head=2), n_positions=64, scale=None, jitter=None)
    quantize_int8(model)
    engine = Engine(model)
    assert all(scales is not None for _, scales in engine.backend.blocks)
    steps, c_calls = [], []
    real_decode, real_blocks = NativeBatch.decode_step, decode.LlamaDecodeBlocks.__call__
    monkeypatch.setattr(NativeBatch, "decode_step", lambda self, last: steps.append(real_decode(self, last)) or steps[-1])
    monkeypatch.setattr(decode.LlamaDecodeBlocks, "__call__", lambda *a, **k: c_calls.append(1) or real_blocks(*a, **k))
    params = SamplingParams(max_new_tokens=10, temperature=0.0, stop_at_eos=False)
    [r] = engine.generate([PROMPTS[1]], params)
    assert len(steps) == 9 and len(c_calls) == 9
    with torch.no_grad():
        want = fp32(torch.tensor([PROMPTS[1] + r.token_ids[:-1]]))[0][0, -1]
    assert (steps[-1][0] - want).abs().max() < 0.05 * want.abs().max()  # int8's error, not a wrong block
    alone = [engine.generate([p], params)[0].token_ids for p in PROMPTS]
    assert [res.token_ids for res in engine.generate(PROMPTS, params)] == alone


@pytest.fixture(params=[v for v in lib.VARIANT_NAMES if v != "avx512"])
def variant(request, monkeypatch):
    """Another build's library in place of the one load() chose (avx512 here), for this test only."""
    return use_kernel_variant(request.param, monkeypatch)


@pytest.mark.parametrize("name", ["llama-gqa-tied", "nanochat-relu2-nogain"])
def test_the_c_step_of_each_build_gives_the_uncached_logits(variant, name, monkeypatch):
    assert lib.load().sg_variant() == variant.encode()
    n_decodes, n_calls = decode_against_uncached(tiny(STEP_OPTIONS[name]), monkeypatch, new_tokens=20)
    assert n_calls == n_decodes > 0


def test_the_forced_avx2_build_decodes_a_qwen3_model_in_one_call_a_step():
    """SIMPLEGPT_CPU_KERNELS=avx2 in a fresh process: load() takes that build, and the C step of an
    int8 and an fp32 GQA + QK-norm model gives the uncached reference's tokens (fp32) and each row's
    tokens alone (int8)."""
    if lib.missing_features(lib.VARIANTS[1]):
        pytest.skip("this CPU cannot run the avx2 build")
    tests = Path(__file__).resolve().parent
    code = ("import torch\n"
            "from simplegpt.accel.cpu import decode, lib\n"
            "from simplegpt.engine import Engine, SamplingParams\n"
            "from simplegpt.quantize import quantize_int8\n"
            "from test_engine import PROMPTS, reference_greedy\n"
            "from test_llama import QWEN3, tiny\n"
            "assert lib.variant() == 'avx2', lib.report()\n"
            "torch.set_num_threads(1)\n"
            "n, real = [], decode.LlamaDecodeBlocks.__call__\n"
            "decode.LlamaDecodeBlocks.__call__ = lambda *a, **k: n.append(1) or real(*a, **k)\n"
            "params = SamplingParams(max_new_tokens=20, temperature=0.0, stop_at_eos=False)\n"
            "model = tiny(dict(QWEN3, n_head=4, n_kv_head=2))\n"
            "got = [r.token_ids for r in Engine(model, window_shift=5).generate(PROMPTS, params)]\n"
            "assert got == [reference_greedy(model, p, 20, 5) for p in PROMPTS] and n\n"
            "quantize_int8(model)\n"
            "engine = Engine(model, window_shift=5)\n"
            "batch = [r.token_ids for r in engine.generate(PROMPTS, params)]\n"
            "assert batch == [engine.generate([p], params)[0].token_ids for p in PROMPTS]\n"
            "print('ok')\n")
    env = {**os.environ, "SIMPLEGPT_CPU_KERNELS": "avx2", "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=tests)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr
