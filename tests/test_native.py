"""The native matrix-vector kernel for batch-1 decoding (simplegpt.native) and its fallback."""

import dataclasses
import multiprocessing
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from simplegpt import GPT, GPTConfig
from simplegpt.accel.cpu import decode as native
from simplegpt.engine import Engine, SamplingParams
from simplegpt.generation.native import NativeBatch, NativeLinear

lib = native.load()
if lib is None and os.environ.get("CI"):
    raise RuntimeError(f"the native kernel must build in CI: {native.unavailable_reason()}")
needs_kernel = pytest.mark.skipif(lib is None, reason=f"native kernel unavailable: {native.unavailable_reason()}")


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("N,K", [(1, 8), (3, 5), (7, 13), (96, 32), (2304, 768), (3001, 771), (50257, 64)])
@pytest.mark.parametrize("rows", [(1, 1), (2, 1), (1, 3), (4, 4)])  # a decode step of B rows; a prefill of B x T
def test_kernel_equals_f_linear(N, K, threads, rows, monkeypatch):
    torch.manual_seed(N * K)
    w, b, x = torch.randn(N, K), torch.randn(N), torch.randn(*rows, K)
    monkeypatch.setattr(native, "_threads", threads)
    with torch.no_grad():
        assert native.usable(x, w)
        for bias in (b, None):
            y = native.linear(x, w, bias)
            ref = F.linear(x.double(), w.double(), None if bias is None else bias.double()).float()
            assert y.shape == (*rows, N)
            assert torch.allclose(y, ref, atol=1e-4 * K ** 0.5, rtol=1e-5)
        assert not native.usable(torch.randn(native.MAX_ROWS + 1, K), w)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("N,K", [(7, 13), (96, 32), (771, 776), (131, 3072)])
def test_rows_of_a_batch_equal_each_row_alone(N, K, threads, monkeypatch):
    """The multi-row products (a 4 x 4 register tile on AVX-512, 4 x 2 on AVX2; a last group of
    fewer rows) give each row exactly what the one-row product gives it, at every row count, so a
    batched decode step decodes each row as alone; and they stay float64-close."""
    torch.manual_seed(N + K)
    w, b, x = torch.randn(N, K), torch.randn(N), torch.randn(native.MAX_ROWS, K)
    monkeypatch.setattr(native, "_threads", threads)
    with torch.no_grad():
        alone = torch.cat([native.linear(x[m:m + 1], w, b) for m in range(len(x))])
        ref = F.linear(x.double(), w.double(), b.double()).float()
        assert torch.allclose(alone, ref, atol=1e-4 * K ** 0.5, rtol=1e-5)
        for M in [2, 3, 4, 5, 7, 8, 13, 16]:
            assert torch.equal(native.linear(x[:M], w, b), alone[:M]), M


def medium(seed=0) -> GPT:
    """Big enough that the kernel splits its rows over threads (N x K >= 32768)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=1000, n_positions=64, n_embd=128, n_layer=2, n_head=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)  # an untrained GPT-2 init repeats its last token; larger weights do not
    return model


@needs_kernel
def test_engine_decodes_through_the_kernel_with_the_same_tokens(monkeypatch):
    calls, blocks = [], []
    real, real_blocks = native.linear, native.DecodeBlocks.__call__
    monkeypatch.setattr(native, "linear", lambda x, w, b: calls.append((x.numel() // w.size(1), w.size(0))) or real(x, w, b))
    monkeypatch.setattr(native.DecodeBlocks, "__call__",
                        lambda self, x, pos, mask=None: blocks.append((len(x), pos, mask is not None))
                        or real_blocks(self, x, pos, mask))
    greedy = SamplingParams(max_new_tokens=30, temperature=0.0, stop_at_eos=False)
    prompts = [[5, 17, 300], [999, 1, 2, 3, 4, 5, 6]]
    threads = torch.get_num_threads()
    fast = Engine(medium())
    assert isinstance(fast.backend.model.lm_head, NativeLinear) and fast.backend.name == "native"
    got = [fast.generate([p], greedy)[0].token_ids for p in prompts]
    # every decode step runs its blocks in one native call, then the head; the head of each prefill too (one row)
    assert len(blocks) == 2 * 29 and blocks[:3] == [(1, 3, False), (1, 4, False), (1, 5, False)]  # rows, slot, mask
    assert [r for r, n in calls if n == 1000] == [1] * (2 * (29 + 1))
    # the prompts' prefills (3 and 7 rows, at most MAX_ROWS) run their 2 x 4 linears in the kernel too
    assert sorted(r for r, n in calls if n != 1000) == [3] * 8 + [7] * 8
    assert torch.get_num_threads() == threads  # torch's threads are given back after each step
    reference = Engine(medium(), use_cache=False)
    assert reference.backend.name != "native"
    assert got == [reference.generate([p], greedy)[0].token_ids for p in prompts]
    # the native step computes what the model's forward computes
    model = medium()
    engine = Engine(model)
    idx = torch.tensor([prompts[1] + got[1][:10]])
    with torch.no_grad():
        want = model(idx)[0][0, -1]
    stream = engine.stream_batch([prompts[1]], dataclasses.replace(greedy, max_new_tokens=11))
    logits_seen = []
    real_step = NativeBatch.decode_step
    monkeypatch.setattr(NativeBatch, "decode_step", lambda self, last: logits_seen.append(real_step(self, last)) or logits_seen[-1])
    list(stream)
    assert torch.allclose(logits_seen[-1][0], want, atol=1e-3, rtol=1e-4)
    # a batch's decode steps run their blocks natively too, with the padding mask of the shorter
    # prompt; its prefill takes the kernel up to MAX_ROWS rows
    calls.clear()
    blocks.clear()
    assert [r.token_ids for r in fast.generate(prompts, greedy)] == got
    assert blocks == [(2, 7 + i, True) for i in range(29)]
    assert sorted(set(calls)) == [(2, 1000), (14, 128), (14, 384), (14, 512)]
    calls.clear()
    three = [*prompts, [8, 9, 10, 11, 12, 13]]
    assert [r.token_ids for r in fast.generate(three, greedy)][:2] == got
    assert {r for r, _ in calls} == {3}  # the prefill's 3 x 7 rows > MAX_ROWS: PyTorch's kernels
    # autograd keeps PyTorch's kernels
    calls.clear()
    x = torch.randn(1, 128, requires_grad=True)
    fast.backend.model.transformer.h[0].mlp.c_fc(x).sum().backward()
    assert not calls and x.grad is not None


def _child_linear(queue):
    torch.set_num_threads(1)  # PyTorch's own OpenMP threads are not usable after fork()
    w, x = torch.ones(4096, 64), torch.ones(1, 64)
    native._threads = 2
    with torch.no_grad():
        queue.put(float(native.linear(x, w, None).sum()))


@needs_kernel
def test_kernel_works_in_a_forked_child():
    """Worker threads do not survive fork(); the child starts its own."""
    with torch.no_grad():
        native.linear(torch.ones(1, 64), torch.ones(4096, 64), None)  # the parent's workers exist
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_linear, args=(queue,))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and queue.get(timeout=5) == 4096 * 64


@needs_kernel
def test_workers_that_went_to_sleep_take_the_next_calls(monkeypatch):
    """Past their spin the pool's workers sleep; the next call wakes them and every part is done once."""
    torch.manual_seed(0)
    w, b, x = torch.randn(3001, 771), torch.randn(3001), torch.randn(2, 771)
    ref = F.linear(x.double(), w.double(), b.double()).float()
    monkeypatch.setattr(native, "_threads", 3)
    with torch.no_grad():
        for pause in (0.0, 0.01, 0.05, 0.0, 0.03):
            time.sleep(pause)  # longer than the workers' spin (0.5 ms): they are asleep
            for _ in range(3):
                assert torch.allclose(native.linear(x, w, b), ref, atol=1e-4 * 771 ** 0.5, rtol=1e-5)


ONE_CORE = """
import os, sys, torch
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
sys.path.insert(0, sys.argv[1])
from test_native import medium
from simplegpt.engine import Engine, SamplingParams
greedy = SamplingParams(max_new_tokens=60, temperature=0.0, stop_at_eos=False)
engine = Engine(medium())
tokens = []
for threads in (1, 3, 1, 3):
    torch.set_num_threads(threads)
    tokens.append([engine.generate([p], greedy)[0].token_ids for p in ([5, 17, 300], [999, 1, 2, 3, 4, 5, 6])])
print(all(t == tokens[0] for t in tokens), engine.backend.name)
"""


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_three_threads_on_one_core_decode_what_one_thread_decodes():
    """On one core the caller takes the parts its workers cannot get to, or waits for a started one
    asleep, and the workers that find they were put aside sleep: the same tokens as one thread."""
    out = subprocess.run([sys.executable, "-c", ONE_CORE, os.path.dirname(__file__)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["True", "native"], out.stderr


FALLBACK = """
import torch
from simplegpt import GPT, GPTConfig
from simplegpt.accel.cpu import decode as native
from simplegpt.engine import Engine, SamplingParams
torch.manual_seed(0)
engine = Engine(GPT(GPTConfig(vocab_size=100, n_positions=32, n_embd=32, n_layer=1, n_head=2)))
r = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=5, temperature=0.0, stop_at_eos=False))[0]
print(engine.backend.name == "native", len(r.token_ids), native.unavailable_reason())
"""


@pytest.mark.parametrize("env,reason", [({"SIMPLEGPT_NATIVE": "0"}, "SIMPLEGPT_NATIVE=0"),
                                        ({"CC": "/nonexistent/cc"}, "/nonexistent/cc")])
def test_without_the_kernel_the_engine_uses_pytorch(tmp_path, env, reason):
    """No compiler (or the kernel switched off): generation works, and the reason is known."""
    # a suite run with the kernels off, or with a variant forced (which makes a failed build an error)
    inherited = {k: v for k, v in os.environ.items() if k not in ("SIMPLEGPT_NATIVE", "SIMPLEGPT_CPU_KERNELS")}
    run_env = {**inherited, "SIMPLEGPT_CACHE": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-c", FALLBACK], env=run_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    uses, n, why = out.stdout.strip().split(" ", 2)
    assert uses == "False" and n == "5" and reason in why
    assert not list((tmp_path / "native").glob("*.tmp")) if (tmp_path / "native").exists() else True



@needs_kernel
@pytest.mark.parametrize("threads", [2, 3])
def test_rows_of_very_different_lengths_decode_as_alone(threads, monkeypatch):
    """The decode step's attention splits its (row, head) pairs between threads by their keys, and
    starts each row at its first real slot: a batch of a 100-token, a 2-token and a 30-token
    prompt (most of the short rows' slots padding) decodes each row exactly as alone."""
    torch.manual_seed(4)
    model = GPT(GPTConfig(vocab_size=400, n_positions=160, n_embd=64, n_layer=2, n_head=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    engine = Engine(model)
    assert engine.backend.blocks is not None
    monkeypatch.setattr(native, "_threads", threads)
    prompts = [list(range(3, 103)), [5, 6], list(range(200, 230))]
    params = SamplingParams(max_new_tokens=20, temperature=0.0, stop_at_eos=False)
    alone = [engine.generate([p], params)[0].token_ids for p in prompts]
    assert [r.token_ids for r in engine.generate(prompts, params)] == alone


@needs_kernel
@pytest.mark.parametrize("bias", [True, False])
def test_block_kernel_on_odd_shapes_equals_the_model(bias, monkeypatch):
    """Widths that are no multiple of the kernel's 8 lanes or 4 rows (C = 33, D = 11, 4C = 132),
    with and without biases: the native decode step's logits equal the model's forward."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=300, n_positions=40, n_embd=33, n_layer=2, n_head=3, bias=bias)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    engine = Engine(model)
    assert engine.backend.blocks is not None
    steps = []
    real_step = NativeBatch.decode_step
    monkeypatch.setattr(NativeBatch, "decode_step", lambda self, last: steps.append(real_step(self, last)) or steps[-1])
    [r] = engine.generate([[7, 8, 9, 10]], SamplingParams(max_new_tokens=12, temperature=0.0, stop_at_eos=False))
    with torch.no_grad():
        want = model(torch.tensor([[7, 8, 9, 10] + r.token_ids[:-1]]))[0][0, -1]
    assert len(steps) == 11 and torch.allclose(steps[-1][0], want, atol=1e-4, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_long_contexts_split_attention_heads_between_threads(threads, monkeypatch):
    """Past 64 cached keys the decode step's attention runs its heads on the pool's threads (5 heads:
    uneven parts, one idle with 3 threads): the logits still equal the model's forward, every step,
    and a batch's rows (split by row and head) decode as they do alone."""
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=500, n_positions=160, n_embd=80, n_layer=2, n_head=5)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    engine = Engine(model)
    monkeypatch.setattr(native, "_threads", threads)
    steps = []
    real_step = NativeBatch.decode_step
    monkeypatch.setattr(NativeBatch, "decode_step", lambda self, last: steps.append(real_step(self, last)) or steps[-1])
    prompt = list(range(40, 100))
    [r] = engine.generate([prompt], SamplingParams(max_new_tokens=90, temperature=0.0, stop_at_eos=False))
    assert len(steps) == 89
    with torch.no_grad():
        want = model(torch.tensor([prompt + r.token_ids[:-1]]))[0][0, len(prompt) - 1:]
    got = torch.cat(steps)
    assert torch.allclose(got, want[1:], atol=1e-3, rtol=1e-4)
    # a batch with left padding (masked cache slots), past 64 keys: each row as it decodes alone
    prompts = [prompt, list(range(7, 30)), list(range(300, 340))]
    params = SamplingParams(max_new_tokens=90, temperature=0.0, stop_at_eos=False)
    alone = [engine.generate([p], params)[0].token_ids for p in prompts]
    assert alone[0] == r.token_ids
    assert [res.token_ids for res in engine.generate(prompts, params)] == alone


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("N,K", [(5, 40), (2304, 768), (131, 3072), (1001, 77)])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_int8_kernel_is_the_integer_dot_product_of_rounded_inputs(N, K, threads, M, monkeypatch):
    """linear_int8 = row scale x (int8 weights . x rounded to int8 with one scale per row) + bias,
    exactly up to float rounding; and close to the fp32 layer it came from. M rows: a batch's decode step."""
    from simplegpt.quantize import Int8Linear

    torch.manual_seed(K)
    lin = torch.nn.Linear(K, N)
    q = Int8Linear(lin)
    x = torch.randn(M, K) * torch.rand(M, 1) * 4  # rows of different ranges: one scale each
    monkeypatch.setattr(native, "_threads", threads)
    with torch.no_grad():
        got = native.linear_int8(x, q.qweight, q.scale, q.bias)  # what the native backend's int8 layers call
        xs = x.abs().amax(-1, keepdim=True) / 127
        xq = torch.round(x / xs)
        want = (xq.double() @ q.qweight.double().t()) * q.scale.double() * xs.double() + lin.bias.double()
        assert got.shape == (M, N)
        assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-5)
        ref = lin(x)
        assert ((got - ref).abs().amax(-1) < 0.02 * ref.abs().amax(-1)).all()
    with pytest.raises(ValueError, match="at most 16 rows"):
        native.linear_int8(torch.randn(17, K), q.qweight, q.scale, None)


@needs_kernel
def test_int8_model_decodes_through_the_block_kernel(monkeypatch):
    from simplegpt.quantize import quantize_int8

    fp32 = medium()
    model = medium()
    quantize_int8(model)
    engine = Engine(model)
    blocks = engine.backend.blocks
    assert engine.backend.name == "native" and blocks is not None and all(scales is not None for _, scales in blocks)
    steps = []
    real_step = NativeBatch.decode_step
    monkeypatch.setattr(NativeBatch, "decode_step", lambda self, last: steps.append(real_step(self, last)) or steps[-1])
    [r] = engine.generate([[5, 17, 300]], SamplingParams(max_new_tokens=10, temperature=0.0, stop_at_eos=False))
    with torch.no_grad():
        want = fp32(torch.tensor([[5, 17, 300] + r.token_ids[:-1]]))[0][0, -1]
    assert len(steps) == 9
    assert (steps[-1][0] - want).abs().max() < 0.05 * want.abs().max()  # int8's error, not a wrong block
    # a batch (each row's activations rounded with their own scale) decodes each row as alone, as
    # long as its prefill fits the kernel too (3 x 5 rows; fbgemm rounds a whole matrix with one scale)
    prompts, params = [[5, 17, 300], [9] * 5, [400, 3]], SamplingParams(max_new_tokens=20, temperature=0.0,
                                                                         stop_at_eos=False)
    alone = [engine.generate([p], params)[0].token_ids for p in prompts]
    assert alone[0][:10] == r.token_ids
    assert [res.token_ids for res in engine.generate(prompts, params)] == alone
