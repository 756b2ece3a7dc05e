"""The native training kernels (simplegpt/native/train.c via simplegpt.native.training)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_gpt
from simplegpt import GPT
from simplegpt.accel.cpu import decode as native
from simplegpt.model import IGNORE_INDEX
from simplegpt.accel import cpu
from simplegpt.accel.cpu import training

lib = native.load()
if lib is None and os.environ.get("CI"):
    raise RuntimeError(f"the native kernels must build in CI: {native.unavailable_reason()}")
pytestmark = pytest.mark.skipif(lib is None, reason=f"native kernels unavailable: {native.unavailable_reason()}")


def reference_attention(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C3 = qkv.shape
    q, k, v = (t.view(B, T, n_head, C3 // 3 // n_head).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C3 // 3)


@pytest.mark.parametrize("n", [1, 7, 8, 13, 4096, 4096 * 3 + 5])
def test_gelu_forward_and_backward_equal_float64(n):
    torch.manual_seed(n)
    x = torch.randn(n, dtype=torch.float64) * 4
    x[:3] = torch.tensor([-20.0, 0.0, 20.0])[: min(3, n)]  # saturated tails and zero
    g = torch.randn(n, dtype=torch.float64)
    ours = x.float().requires_grad_()
    y = training.gelu(ours)
    y.backward(g.float())
    ref = x.clone().requires_grad_()
    F.gelu(ref, approximate="tanh").backward(g)
    want = F.gelu(x, approximate="tanh")
    assert torch.allclose(y.double(), want, atol=1e-6, rtol=1e-6)
    assert torch.allclose(ours.grad.double(), ref.grad, atol=1e-5, rtol=1e-5)
    # as accurate as PyTorch's own fp32 kernel, within a factor of 4
    torch_err = (F.gelu(x.float(), approximate="tanh").double() - want).abs().max()
    assert (y.double() - want).abs().max() <= 4 * torch_err + 1e-7


@pytest.mark.parametrize("B,T,C,H", [(12, 64, 128, 4), (2, 13, 64, 2), (3, 37, 96, 3), (1, 2, 8, 1),
                                     (1, 128, 256, 4), (5, 9, 128, 16), (2, 33, 256, 4), (1, 7, 32, 2)])
def test_attention_forward_and_backward_equal_float64(B, T, C, H):
    torch.manual_seed(B * T + C)
    qkv = torch.randn(B, T, 3 * C, dtype=torch.float64) * 2
    g = torch.randn(B, T, C, dtype=torch.float64)
    ours = qkv.float().requires_grad_()
    y = training.causal_attention(ours, H)
    y.backward(g.float())
    ref = qkv.clone().requires_grad_()
    want = reference_attention(ref, H)
    want.backward(g)
    # PyTorch's own fp32 kernel on the same input sets the error allowed
    fp32 = qkv.float().requires_grad_()
    reference_attention(fp32, H).backward(g.float())
    torch_err = (reference_attention(fp32, H).double() - want).abs().max()
    assert y.shape == (B, T, C)
    assert (y.double() - want).abs().max() <= 4 * torch_err + 1e-6
    assert (ours.grad.double() - ref.grad).abs().max() <= 4 * (fp32.grad.double() - ref.grad).abs().max() + 1e-6


@pytest.mark.parametrize("R,C,bias", [(768, 128, True), (1, 8, True), (37, 13, False), (100, 771, True)])
def test_layer_norm_forward_and_backward_equal_float64(R, C, bias):
    torch.manual_seed(R + C)
    x = torch.randn(R, C, dtype=torch.float64) * 3 + 1
    w, b = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64) if bias else None
    g = torch.randn(R, C, dtype=torch.float64)
    leaves = [t.float().requires_grad_() for t in (x, w)] + ([b.float().requires_grad_()] if bias else [])
    y = training.layer_norm(leaves[0], leaves[1], leaves[2] if bias else None, 1e-5)
    y.backward(g.float())
    ref = [t.clone().requires_grad_() for t in (x, w)] + ([b.clone().requires_grad_()] if bias else [])
    want = F.layer_norm(ref[0], (C,), ref[1], ref[2] if bias else None, 1e-5)
    want.backward(g)
    assert torch.allclose(y.double(), want, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(leaves, ref):
        assert torch.allclose(ours.grad.double(), theirs.grad, atol=1e-4 * R ** 0.5, rtol=1e-4)


def test_kernels_give_the_same_bits_on_any_thread_count():
    """Exact resume needs the same bits run to run: every (batch, head) pair is one work item."""
    torch.manual_seed(0)
    qkv = torch.randn(7, 40, 3 * 64, requires_grad=True)
    h = torch.randn(3, 40, 256, requires_grad=True)
    w, b = torch.randn(256, requires_grad=True), torch.randn(256, requires_grad=True)
    g, gh = torch.randn(7, 40, 64), torch.randn(3, 40, 256)
    saved, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert lib.sg_omp_threads() in (1, threads)  # torch's OpenMP threads, where OpenMP is used
            qkv.grad = h.grad = w.grad = b.grad = None
            y = training.causal_attention(qkv, 4)
            y.backward(g)
            z = training.gelu(training.layer_norm(h, w, b, 1e-5))
            z.backward(gh)
            results.append([y.detach(), qkv.grad, z.detach(), h.grad, w.grad, b.grad])
    finally:
        torch.set_num_threads(saved)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def tiny(**overrides) -> GPT:
    """A tiny GPT as a training step runs it: through simplegpt.accel.cpu.for_training."""
    return cpu.for_training(make_tiny_gpt(**{"n_embd": 64, "n_head": 4, **overrides}))


def loss_and_grads(model: GPT, idx: torch.Tensor) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    _, loss = model(idx[:, :-1], targets=idx[:, 1:])
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fused_block", [True, False])
def test_training_step_takes_the_kernels_and_matches_pytorch(bias, fused_block, monkeypatch):
    model = tiny(bias=bias)
    with torch.no_grad():  # as after some training: no zero biases or unit LayerNorm weights left
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    idx = torch.randint(0, 50, (4, 25))
    calls = []
    real_gelu, real_attn, real_ln, real_block = training.gelu, training.causal_attention, training.layer_norm, \
        training.block
    monkeypatch.setattr(training, "gelu", lambda x: calls.append("gelu") or real_gelu(x))
    monkeypatch.setattr(training, "causal_attention", lambda q, h: calls.append("attn") or real_attn(q, h))
    monkeypatch.setattr(training, "layer_norm", lambda *a: calls.append("ln") or real_ln(*a))
    monkeypatch.setattr(training, "block", lambda *a: calls.append("block") or real_block(*a))
    if not fused_block:  # the kernels one op at a time, as for a block the fused path does not take
        monkeypatch.setattr(training, "block_usable", lambda x, b: False)
    loss, grads = loss_and_grads(model, idx)
    if fused_block:
        assert calls.count("block") == 2 and calls.count("ln") == 1 and "gelu" not in calls and "attn" not in calls
    else:
        assert calls.count("gelu") == 2 and calls.count("attn") == 2 and calls.count("ln") == 5
    monkeypatch.setattr(training, "usable", lambda x: False)
    monkeypatch.setattr(training, "attention_usable", lambda q, h: False)
    monkeypatch.setattr(training, "block_usable", lambda x, b: False)
    calls.clear()
    ref_loss, ref_grads = loss_and_grads(model, idx)
    assert not calls
    assert abs(loss - ref_loss) < 1e-5
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("case", ["no_grad", "dropout", "odd_head", "long", "float64", "mask", "no_blas"])
def test_kernels_are_left_out_where_they_do_not_apply(case, monkeypatch):
    calls = []
    real_gelu, real_attn, real_block = training.gelu, training.causal_attention, training.block
    monkeypatch.setattr(training, "gelu", lambda x: calls.append("gelu") or real_gelu(x))
    monkeypatch.setattr(training, "causal_attention", lambda q, h: calls.append("attn") or real_attn(q, h))
    monkeypatch.setattr(training, "block", lambda *a: calls.append("block") or real_block(*a))
    if case == "no_blas":  # a torch whose BLAS has no sgemm_ for the fused block: the kernels one by one
        monkeypatch.setattr(training, "_sgemm", False)
    T = 20
    model = {"dropout": tiny(dropout=0.1), "odd_head": tiny(n_embd=96, n_head=2),
             "long": tiny(n_positions=512)}.get(case, tiny())
    if case == "long":
        T = training.MAX_ATTENTION_T + 1
    if case == "float64":
        model = model.double()
    idx = torch.randint(0, 50, (2, T))
    if case == "no_grad":
        with torch.no_grad():
            model(idx)
    elif case == "mask":
        model(idx, attention_mask=torch.ones(2, T, dtype=torch.long))
    else:
        model(idx)
    want = {"dropout": ["gelu"] * 2, "odd_head": ["gelu"] * 2, "long": ["gelu"] * 2, "mask": ["gelu"] * 2,
            "no_blas": ["attn", "gelu"] * 2}
    assert calls == want.get(case, [])


def test_fused_block_leaves_frozen_weights_without_gradients(monkeypatch):
    """Fine-tuning with some weights frozen: the fused block skips their products and matches PyTorch."""
    model = tiny()
    frozen = [model.transformer.h[0].attn.c_attn.weight, model.transformer.h[1].mlp.c_fc.bias,
              model.transformer.h[1].ln_2.weight]
    for p in frozen:
        p.requires_grad_(False)
    idx = torch.randint(0, 50, (3, 17))
    calls = []
    real_block = training.block
    monkeypatch.setattr(training, "block", lambda *a: calls.append("block") or real_block(*a))
    loss, grads = loss_and_grads(model, idx)
    assert calls == ["block"] * 2 and all(p.grad is None for p in frozen)
    monkeypatch.setattr(training, "block_usable", lambda x, b: False)
    ref_loss, ref_grads = loss_and_grads(model, idx)
    assert abs(loss - ref_loss) < 1e-5 and grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], atol=1e-5, rtol=1e-4), name


def test_threads_that_load_while_another_builds_wait_for_the_library(tmp_path):
    """A split training step starts its shares at once: none may run without the kernels."""
    import subprocess
    import sys

    code = ("import threading\nfrom simplegpt.accel import cpu as native\nout = []\n"
            "ts = [threading.Thread(target=lambda: out.append(native.load())) for _ in range(4)]\n"
            "[t.start() for t in ts]\n[t.join() for t in ts]\n"
            "assert len(out) == 4 and all(lib is not None for lib in out), (out, native.unavailable_reason())\n"
            "assert len({id(lib) for lib in out}) == 1\nprint('ok')\n")
    env = {**os.environ, "SIMPLEGPT_CACHE": str(tmp_path)}  # an empty cache: the first thread compiles
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert list((tmp_path / "native").glob("kernels-*.so"))


def randomized(model: GPT) -> GPT:
    with torch.no_grad():  # as after some training: no zero biases or unit LayerNorm weights left
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def loss_grads_via(model: GPT, idx: torch.Tensor, targets: torch.Tensor, method: str) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = model.loss(idx, targets) if method == "loss" else model(idx, targets)[1]
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T", [2, 25, 32])
def test_whole_model_loss_equals_the_module_path(bias, T, monkeypatch):
    model = randomized(tiny(bias=bias))
    idx = torch.randint(0, 50, (3, T))
    targets = torch.randint(0, 50, (3, T))
    targets[0, : T // 2] = IGNORE_INDEX  # padding-like rows take no loss
    calls = []
    real = training.model_loss
    monkeypatch.setattr(training, "model_loss", lambda *a: calls.append(1) or real(*a))
    loss, grads = loss_grads_via(model, idx, targets, "loss")
    assert calls == [1]
    ref_loss, ref_grads = loss_grads_via(model, idx, targets, "forward")
    assert abs(loss - ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], atol=1e-5, rtol=1e-4), name


def test_whole_model_loss_leaves_frozen_weights_alone():
    model = randomized(tiny())
    model.transformer.wte.weight.requires_grad_(False)
    model.transformer.h[1].attn.c_proj.weight.requires_grad_(False)
    idx, targets = torch.randint(0, 50, (2, 20)), torch.randint(0, 50, (2, 20))
    loss, grads = loss_grads_via(model, idx, targets, "loss")
    ref_loss, ref_grads = loss_grads_via(model, idx, targets, "forward")
    assert "transformer.wte.weight" not in grads and grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("case", ["mask", "dropout", "no_grad", "untied", "long", "autocast"])
def test_whole_model_loss_falls_back_where_it_does_not_apply(case, monkeypatch):
    calls = []
    real = training.model_loss
    monkeypatch.setattr(training, "model_loss", lambda *a: calls.append(1) or real(*a))
    model = randomized(tiny(dropout=0.1) if case == "dropout" else tiny(n_positions=512) if case == "long" else tiny())
    if case == "untied":
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    T = training.MAX_ATTENTION_T + 1 if case == "long" else 12
    idx, targets = torch.randint(0, 50, (2, T)), torch.randint(0, 50, (2, T))
    if case == "mask":
        loss = model.loss(idx, targets, attention_mask=torch.ones(2, T, dtype=torch.long))
    elif case == "no_grad":
        with torch.no_grad():
            loss = model.loss(idx, targets)
    elif case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(idx, targets)
    else:
        loss = model.loss(idx, targets)
    assert not calls and torch.isfinite(loss)
    if case not in ("dropout", "autocast"):
        model.eval()
        with torch.no_grad():
            assert abs(float(loss) - float(model(idx, targets)[1])) < 1e-5


def test_whole_model_loss_refuses_a_target_outside_the_vocabulary():
    model = tiny()
    idx = torch.randint(0, 50, (2, 10))
    targets = idx.clone()
    targets[1, 3] = 50
    with pytest.raises(ValueError, match="target token ids must be in 0..49"):
        model.loss(idx, targets)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_trainer_takes_the_whole_model_step(tmp_path, shakespeare_path, monkeypatch, threads):
    """Alone and in each share of a split step (2 threads)."""
    from simplegpt.config import TrainConfig
    from simplegpt.training.loop import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_path.read_text()[:20_000])
    calls, real = [], training.model_loss
    monkeypatch.setattr(training, "model_loss", lambda *a: calls.append(a[1].shape) or real(*a))
    cfg = TrainConfig(data=str(corpus), data_dir=str(tmp_path / "data"), n_layer=1, n_head=2, n_embd=16,
                      block_size=16, batch_size=4, max_iters=3, eval_interval=3, eval_iters=1, sample_tokens=0,
                      num_threads=threads, plot=False, tensorboard=False, peak_flops=1e12,
                      out_dir=str(tmp_path / "run"))
    result = train(cfg, progress=False, log=lambda s: None)
    assert calls == [(4 // threads, 16)] * 3 * threads
    assert all(math.isfinite(x) for x in result.losses)


def test_no_thread_sees_blas_ready_before_the_kernels_have_sgemm(monkeypatch):
    """Core shards' threads ask at once: the one that finds torch's sgemm hands it to the C side, and
    another must not get True (and run a kernel that calls through a null pointer) before that is done."""
    import threading

    from simplegpt.accel.cpu import training as native

    real = native.load()
    entered, release = threading.Event(), threading.Event()
    handed = []

    class Spy:  # the real library; its sg_set_sgemm waits until the second thread has asked
        def __getattr__(self, name):
            return getattr(real, name)

        def sg_set_sgemm(self, address):
            entered.set()
            release.wait(5)
            real.sg_set_sgemm(address)
            handed.append(address)

    monkeypatch.setattr(native, "_sgemm", None)
    monkeypatch.setattr(native, "load", lambda: Spy())
    first = threading.Thread(target=native._blas_ready)
    first.start()
    assert entered.wait(5)
    seen = []
    second = threading.Thread(target=lambda: seen.append((native._blas_ready(), list(handed))))
    second.start()
    second.join(0.5)
    release.set()
    first.join(5)
    second.join(5)
    ready, handed_when_ready = seen[0]
    assert not ready or handed_when_ready, "a thread saw the kernels ready before they had sgemm"
