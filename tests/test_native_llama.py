"""The CPU kernels of Llama-style blocks (accel/cpu/llama_ops) applied from outside: the training twin
(accel.cpu.for_training) and the native decode backend run RMSNorm, rotary positions, SwiGLU/ReLU^2
and grouped-query attention on the kernels, with PyTorch's results."""

import os

import pytest
import torch

from simplegpt.accel import cpu
from simplegpt.accel.cpu import llama_ops
from simplegpt.engine import Engine, SamplingParams
from simplegpt.quantize import quantize_int8
from simplegpt.training.loop import train

from conftest import make_tiny_gpt
from test_engine import PROMPTS, reference_greedy
from test_llama import COMBOS, QWEN3, corpus, run_config, tiny  # noqa: F401 (corpus: a fixture)

if cpu.load() is None and os.environ.get("CI"):
    raise RuntimeError(f"the native kernels must build in CI: {cpu.unavailable_reason()}")
pytestmark = pytest.mark.skipif(cpu.load() is None, reason=f"native kernels unavailable: {cpu.unavailable_reason()}")

KERNELS = ("rms_norm", "rope", "swiglu", "relu2", "causal_attention", "qkv_attention", "swiglu_fused")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def calls(monkeypatch):
    """Counts of the llama_ops kernels called (by name), and of decode.attention_step ("attention_step")."""
    counts: dict[str, int] = {}

    def spy(module, name):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)

    for name in KERNELS:
        spy(llama_ops, name)
    from simplegpt.accel.cpu import decode
    spy(decode, "attention_step")
    return counts


@pytest.mark.parametrize("name", ["llama", "qwen3", "nanochat"])
def test_training_twin_runs_the_kernels_with_float64_gradients(name, calls):
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
    # training: QK-norm, rotary positions and attention as one node from c_attn's output; SwiGLU from c_fc's
    used = {"rms_norm", "qkv_attention", "relu2" if options["mlp"] == "relu2" else "swiglu_fused"}
    assert used <= set(calls), calls
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
    assert calls.get("attention_step", 0) > 0 and calls.get("rms_norm", 0) > 0 and calls.get("rope", 0) > 0
    assert calls.get("relu2" if COMBOS[name]["mlp"] == "relu2" else "swiglu_fused", 0) > 0
    with cpu.disabled():
        eager = Engine(model, window_shift=5)
        assert eager.backend.name == "eager"
        assert [r.token_ids for r in eager.generate(PROMPTS, params)] == tokens
    uncached = Engine(model, use_cache=False, window_shift=5)
    assert [r.token_ids for r in uncached.generate(PROMPTS, params)] == tokens
    assert tokens == [reference_greedy(model, p, 24, 5) for p in PROMPTS]


def test_native_int8_decode_of_a_gqa_model_runs_attention_step_and_each_row_as_alone(calls):
    model = tiny(dict(QWEN3, head_size=16), n_positions=64, scale=None, jitter=None)
    quantize_int8(model)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    engine = Engine(model)
    batch = [r.token_ids for r in engine.generate(PROMPTS, params)]
    assert calls.get("attention_step", 0) > 0
    assert batch == [engine.generate([p], params)[0].token_ids for p in PROMPTS]

