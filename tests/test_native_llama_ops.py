"""The CPU kernels of Llama-style blocks (simplegpt.accel.cpu.llama_ops, decode.attention_step) against
PyTorch in float64: RMSNorm, RoPE, SwiGLU, ReLU^2 and causal grouped-query attention forward and
backward, and the decode step's attention over a KV cache. Every test runs on each build this CPU
can run (lib.VARIANTS: avx512, avx2, portable), swapped into this process as test_native_variants.py
does; one test forces a build through SIMPLEGPT_CPU_KERNELS in a fresh process, and one builds the
portable one for aarch64 and runs tests/native/check_llama_kernels.c under qemu."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from simplegpt.accel.cpu import decode, lib, llama_ops

from conftest import use_kernel_variant

if lib.load() is None and os.environ.get("CI"):
    raise RuntimeError(f"the CPU kernels must build in CI: {lib.unavailable_reason()}")
pytestmark = pytest.mark.skipif(lib.load() is None, reason=f"CPU kernels unavailable: {lib.unavailable_reason()}")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=lib.VARIANT_NAMES)
def variant(request, monkeypatch):
    """The variant's library in place of the one load() chose, for this test only."""
    return use_kernel_variant(request.param, monkeypatch)


def ref_rms_norm(x, w, eps):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def ref_rope(x, cos, sin):
    """Hugging Face Llama's apply_rotary_pos_emb, with its (.., T, D) tables of two equal halves."""
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def ref_attention(q, k, v):
    G = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def grads(fn, inputs, g):
    """fn(*inputs) and the gradients of (fn(*inputs) * g).sum() for each input, as float64."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    y.backward(g.to(y.dtype))
    return y.detach().double(), [t.grad.double() for t in leaves]


def check(ours, want, fp32, what):
    """ours within 4x PyTorch's own fp32 error (fp32: PyTorch's fp32 result) of the float64 want, plus 1e-6"""
    err, torch_err = (ours - want).abs().max(), (fp32 - want).abs().max()
    assert err <= 4 * torch_err + 1e-6 * (1 + want.abs().max()), f"{what}: {err} vs PyTorch's fp32 {torch_err}"


def compare(kernel, reference, inputs64, g64):
    """kernel on fp32 inputs against reference in float64 and fp32, forward and every input's gradient."""
    y, gs = grads(kernel, [t.float() for t in inputs64], g64.float())
    want, wants = grads(reference, inputs64, g64)
    y32, gs32 = grads(reference, [t.float() for t in inputs64], g64.float())
    assert y.shape == want.shape
    check(y, want, y32, "forward")
    for i, (a, b, c) in enumerate(zip(gs, wants, gs32)):
        check(a, b, c, f"gradient {i}")


@pytest.mark.parametrize("gain", [True, False])
def test_rms_norm_forward_and_backward_equal_float64(variant, gain):
    for R, C, eps in [(1, 8, 1e-6), (37, 13, 1e-5), (100, 771, 1e-6), (2 * 3 * 7, 64, 1e-5)]:
        torch.manual_seed(R + C)
        x = torch.randn(R, C, dtype=torch.float64) * 3 + 0.5
        w = torch.randn(C, dtype=torch.float64)
        g = torch.randn(R, C, dtype=torch.float64)
        if gain:
            compare(lambda x, w: llama_ops.rms_norm(x, w, eps), lambda x, w: ref_rms_norm(x, w, eps), [x, w], g)
        else:
            compare(lambda x: llama_ops.rms_norm(x, None, eps), lambda x: ref_rms_norm(x, None, eps), [x], g)
    # QK-norm: each head's D floats of a (B, H, T, D) view, F.rms_norm as the model would call it
    q = torch.randn(2, 9, 3, 32)
    w = torch.randn(32)
    assert torch.allclose(llama_ops.rms_norm(q.transpose(1, 2), w, 1e-6),
                          F.rms_norm(q.transpose(1, 2), (32,), w, 1e-6), atol=1e-5)


@pytest.mark.parametrize("B,H,T,D", [(2, 3, 13, 32), (1, 2, 37, 64), (3, 1, 5, 8), (1, 2, 4, 6), (2, 2, 17, 128)])
def test_rope_forward_and_backward_equal_float64(variant, B, H, T, D):
    torch.manual_seed(B * T + D)
    for theta, positions in [(10000.0, torch.arange(T)), (1e6, torch.randint(0, 4000, (B, T)))]:
        x = torch.randn(B, T, H, D, dtype=torch.float64).transpose(1, 2)  # a projection's view: no copy
        g = torch.randn(B, H, T, D, dtype=torch.float64)
        cos, sin = llama_ops.rope_cos_sin(positions, D, theta)
        assert cos.shape == (*positions.shape, D // 2) and cos.dtype == torch.float32
        # the tables in float64 from the same fp32 angles, as Hugging Face's are
        inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
        angles = (positions.float()[..., None] * inv).double()
        c64, s64 = angles.cos(), angles.sin()
        assert torch.allclose(cos.double(), c64, atol=1e-6) and torch.allclose(sin.double(), s64, atol=1e-6)
        compare(lambda x: llama_ops.rope(x, cos, sin), lambda x: ref_rope(x, c64.to(x.dtype), s64.to(x.dtype)), [x], g)
        # Hugging Face's full (.., T, D) tables give the same
        full = [torch.cat([t, t], -1) for t in (cos, sin)]
        assert torch.equal(llama_ops.rope(x.float(), *full), llama_ops.rope(x.float(), cos, sin))
    with pytest.raises(ValueError, match="rope: x"):
        llama_ops.rope(x.float(), cos[..., :1], sin[..., :1])


def test_swiglu_and_relu2_forward_and_backward_equal_float64(variant):
    for shape in [(1,), (13,), (3, 37, 100), (2, 4096 + 3)]:
        torch.manual_seed(sum(shape))
        gate, up = torch.randn(*shape, dtype=torch.float64) * 4, torch.randn(*shape, dtype=torch.float64)
        gate.view(-1)[:3] = torch.tensor([-100.0, 0.0, 100.0])[: gate.numel()]  # saturated tails and zero
        g = torch.randn(*shape, dtype=torch.float64)
        compare(llama_ops.swiglu, lambda a, b: F.silu(a) * b, [gate, up], g)
        compare(llama_ops.relu2, lambda a: F.relu(a).square(), [gate], g)
    # the halves of a fused gate|up product, taken without copies
    fused = torch.randn(4, 9, 2 * 40, dtype=torch.float64)
    g = torch.randn(4, 9, 40, dtype=torch.float64)
    compare(lambda t: llama_ops.swiglu(*t.chunk(2, -1)), lambda t: F.silu(t[..., :40]) * t[..., 40:], [fused], g)
    with pytest.raises(ValueError, match="swiglu: gate"):
        llama_ops.swiglu(torch.randn(3, 4), torch.randn(4, 3))


@pytest.mark.parametrize("B,H,Hkv,T,D", [(2, 4, 4, 13, 32), (1, 4, 2, 37, 64), (2, 8, 2, 65, 32), (3, 2, 1, 2, 8),
                                         (1, 4, 1, 24, 64), (1, 2, 1, 19, 128), (2, 3, 3, 9, 16),
                                         (1, 2, 2, 11, 96)])
def test_gqa_attention_forward_and_backward_equal_float64(variant, B, H, Hkv, T, D):
    torch.manual_seed(B * T + D + H)
    # q, k, v as the heads of one fused projection (B, T, (H + 2 Hkv) D): strided views, no copies
    qkv = torch.randn(B, T, H + 2 * Hkv, D, dtype=torch.float64) * 2
    g = torch.randn(B, H, T, D, dtype=torch.float64)

    def split(t):
        return [p.transpose(1, 2) for p in t.split([H, Hkv, Hkv], dim=2)]

    q, k, v = split(qkv.float())
    assert llama_ops.attention_usable(q, k, v)
    y = llama_ops.causal_attention(q, k, v)
    assert y.shape == (B, H, T, D) and y.transpose(1, 2).is_contiguous()  # the output projection's layout
    compare(lambda t: llama_ops.causal_attention(*split(t)), lambda t: ref_attention(*split(t)), [qkv], g)
    # contiguous (B, H, T, D) inputs, as after the rotary embedding
    compare(llama_ops.causal_attention, ref_attention, [t.contiguous() for t in split(qkv)], g)


def test_fused_swiglu_takes_gate_up_and_returns_one_gradient(variant):
    """swiglu_fused on c_fc's (..., 2F) output: forward and its one (..., 2F) gradient in float64."""
    for shape in [(1, 2), (3, 5, 2 * 37), (2, 7, 2 * 384), (4, 2 * (4096 + 3))]:
        torch.manual_seed(sum(shape))
        h = torch.randn(*shape, dtype=torch.float64) * 3
        h.view(-1)[:3] = torch.tensor([-100.0, 0.0, 100.0])[: h.numel()]
        F_ = shape[-1] // 2
        g = torch.randn(*shape[:-1], F_, dtype=torch.float64)
        compare(llama_ops.swiglu_fused, lambda t: F.silu(t[..., :F_]) * t[..., F_:], [h], g)
    with pytest.raises(ValueError, match="swiglu_fused"):
        llama_ops.swiglu_fused(torch.randn(2, 5))


def ref_qkv_attention(qkv, H, K, rope, qk_norm):
    """model.CausalSelfAttention's heads and attention in PyTorch ops: split, QK-norm, rotate, SDPA."""
    B, T, W = qkv.shape
    D = W // (H + 2 * K)
    q, k, v = qkv.split([H * D, K * D, K * D], dim=2)
    q, k, v = q.view(B, T, H, D), k.view(B, T, K, D), v.view(B, T, K, D)
    if qk_norm is not None:
        q, k = ref_rms_norm(q, qk_norm[0], qk_norm[2]), ref_rms_norm(k, qk_norm[1], qk_norm[2])
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if rope is not None:
        q, k = ref_rope(q, *rope), ref_rope(k, *rope)
    return ref_attention(q, k, v)


@pytest.mark.parametrize("B,H,K,T,D", [(2, 4, 2, 13, 32), (3, 2, 1, 2, 8), (2, 6, 2, 19, 16), (1, 2, 2, 11, 96)])
@pytest.mark.parametrize("rope_kind", [None, "shared", "per-row"])
@pytest.mark.parametrize("norm", [None, "gain", "no-gain"])
def test_qkv_attention_with_rope_and_qk_norm_equals_float64(variant, B, H, K, T, D, rope_kind, norm):
    """qkv_attention from a fused q|k|v product against PyTorch's split/QK-norm/rotate/SDPA in float64,
    forward and the gradients of the product (one tensor) and of the QK-norm gains."""
    torch.manual_seed(B * T + D + H + K)
    qkv = torch.randn(B, T, (H + 2 * K) * D, dtype=torch.float64) * 2
    g = torch.randn(B, H, T, D, dtype=torch.float64)
    rope = None
    if rope_kind is not None:
        positions = torch.arange(T) if rope_kind == "shared" else torch.randint(0, 500, (B, T))
        cos, sin = llama_ops.rope_cos_sin(positions, D, 10000.0)
        rope = cos, sin
    eps = 1e-6
    weights = [torch.randn(D, dtype=torch.float64) * 0.5 + 1, torch.randn(D, dtype=torch.float64) * 0.5 + 1]
    inputs = [qkv] + (weights if norm == "gain" else [])

    def ours(t, *w):
        qk = None if norm is None else (*(w if w else (None, None)), eps)
        return llama_ops.qkv_attention(t, H, K, rope, qk)

    def reference(t, *w):
        qk = None if norm is None else (*(w if w else (None, None)), eps)
        r = None if rope is None else tuple(x.to(t.dtype) for x in rope)
        return ref_qkv_attention(t, H, K, r, qk)

    assert llama_ops.qkv_attention_usable(qkv.float(), H, K)
    compare(ours, reference, inputs, g)
    y = ours(*[t.float() for t in inputs])
    assert y.shape == (B, H, T, D) and y.transpose(1, 2).is_contiguous()  # the output projection's layout


def test_qkv_attention_usable_and_its_errors():
    qkv = torch.randn(2, 8, (4 + 2 * 2) * 32)
    assert llama_ops.qkv_attention_usable(qkv, 4, 2)
    assert not llama_ops.qkv_attention_usable(qkv, 4, 3)  # 4 query heads do not split over 3
    assert not llama_ops.qkv_attention_usable(qkv[:, :1], 4, 2)
    assert not llama_ops.qkv_attention_usable(qkv.double(), 4, 2)
    assert not llama_ops.qkv_attention_usable(torch.randn(2, 8, (4 + 2 * 2) * 24), 4, 2)  # head size 24
    cos, sin = llama_ops.rope_cos_sin(torch.arange(7), 32, 10000.0)
    with pytest.raises(ValueError, match="qkv_attention: heads of 32"):
        llama_ops.qkv_attention(qkv, 4, 2, (cos, sin))


def test_a_llama_training_step_joins_no_gradients(monkeypatch):
    """The training twin of a Llama-style model (rotary, QK-norm, GQA, SwiGLU) computes its loss
    without a split of c_attn's or c_fc's output in the autograd graph, so backward runs no cat
    to join their gradients; its gradients equal PyTorch's own model's. (Op by op: the path of the
    steps the whole-model pass, llama_model, does not take.)"""
    from conftest import make_tiny_gpt
    from simplegpt.accel.cpu import for_training, llama_model

    monkeypatch.setattr(llama_model, "usable", lambda *a: False)

    model = make_tiny_gpt(seed=0, vocab_size=50, n_embd=64, n_head=4, n_kv_head=2, positions="rotary",
                          norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False)
    idx, targets = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    twin = for_training(model)
    loss = twin.loss(idx, targets)
    names, todo, seen = set(), [loss.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    assert not {n for n in names if n.startswith(("Split", "Cat", "Chunk"))}, names
    assert {"_QKVAttentionBackward", "_FusedSwiGLUBackward"} <= names, names
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.loss(idx, targets).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(ours[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_attention_usable_refuses_what_the_kernel_does_not_take():
    def qkv(B=1, H=4, Hkv=2, T=8, D=32, dtype=torch.float32):
        return torch.randn(B, H, T, D, dtype=dtype), *(torch.randn(B, Hkv, T, D, dtype=dtype) for _ in range(2))

    assert llama_ops.attention_usable(*qkv())
    assert not llama_ops.attention_usable(*qkv(Hkv=3))  # 4 query heads do not split over 3
    assert not llama_ops.attention_usable(*qkv(D=24)) and not llama_ops.attention_usable(*qkv(D=48))
    assert not llama_ops.attention_usable(*qkv(T=1))
    assert not llama_ops.attention_usable(*qkv(T=llama_ops.MAX_ATTENTION_T + 1))
    assert not llama_ops.attention_usable(*qkv(dtype=torch.float64))
    with lib.disabled():
        assert not llama_ops.attention_usable(*qkv())


def test_llama_kernels_give_the_same_bits_on_any_thread_count():
    """Exact resume needs the same bits run to run: the shared key/value heads' gradients and the
    RMSNorm gain's are summed in a fixed order, whatever the threads."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 40, 64), torch.randn(3, 2, 40, 64), torch.randn(3, 2, 40, 64)
    x, w = torch.randn(300, 96), torch.randn(96)
    gq, gx = torch.randn(3, 8, 40, 64), torch.randn(300, 96)
    saved, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y, grads_a = grads(llama_ops.causal_attention, [q, k, v], gq)
            z, grads_n = grads(lambda x, w: llama_ops.rms_norm(x, w, 1e-6), [x, w], gx)
            results.append([y, z, *grads_a, *grads_n])
    finally:
        torch.set_num_threads(saved)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def ref_decode(q, k, v, length, mask):
    """q (B, H, D) against the cache's first `length` slots, padding (mask 0) left out, in float64"""
    B, H, D = q.shape
    G = H // k.size(1)
    k, v = k[:B, :, :length].double().repeat_interleave(G, 1), v[:B, :, :length].double().repeat_interleave(G, 1)
    s = torch.einsum("bhd,bhsd->bhs", q.double(), k) / D ** 0.5
    if mask is not None:
        s = s.masked_fill(mask[:B, None, :length] == 0, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a row with no real slot: zeros
    return torch.einsum("bhs,bhsd->bhd", p, v)


@pytest.mark.parametrize("B,H,Hkv,D,length", [(1, 4, 4, 32, 1), (3, 4, 2, 64, 37), (17, 8, 2, 32, 70),
                                              (2, 4, 1, 128, 100), (5, 6, 3, 16, 9)])
@pytest.mark.parametrize("threads", [1, 3])
def test_decode_attention_step_equals_float64(variant, B, H, Hkv, D, length, threads, monkeypatch):
    torch.manual_seed(B * H + length)
    monkeypatch.setattr(decode, "_threads", threads)
    k, v = torch.randn(B + 1, Hkv, length + 5, D), torch.randn(B + 1, Hkv, length + 5, D)  # a bigger cache
    q = torch.randn(B, H + 1, D)[:, :H]  # rows of a wider buffer
    mask = torch.ones(B, length + 3, dtype=torch.int64)
    for b in range(B):  # left padding of different lengths; one row with nothing real yet
        mask[b, : (b * 7) % length] = 0
    if B > 2:
        mask[2, :length] = 0
    with torch.no_grad():
        for m in (None, mask):
            out = decode.attention_step(q, k, v, length, m)
            assert out.shape == (B, H, D)
            assert torch.allclose(out.double(), ref_decode(q, k, v, length, m), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention_step"):
        decode.attention_step(q, k, v, length + 6)
    with pytest.raises(ValueError, match="attention_step: mask"):
        decode.attention_step(q, k, v, length, mask.int())


def test_a_forced_variant_runs_the_llama_kernels_in_a_fresh_process():
    """SIMPLEGPT_CPU_KERNELS=portable (what an ARM machine builds) in a new process: load() takes it
    and the ops agree with PyTorch there."""
    code = ("import torch, torch.nn.functional as F\n"
            "from simplegpt.accel.cpu import lib, llama_ops\n"
            "assert lib.variant() == 'portable', lib.report()\n"
            "q, k, v = torch.randn(2, 4, 11, 32), torch.randn(2, 2, 11, 32), torch.randn(2, 2, 11, 32)\n"
            "ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)\n"
            "assert torch.allclose(llama_ops.causal_attention(q, k, v), ref, atol=1e-5)\n"
            "x, w = torch.randn(5, 40), torch.randn(40)\n"
            "assert torch.allclose(llama_ops.rms_norm(x, w, 1e-6), F.rms_norm(x, (40,), w, 1e-6), atol=1e-5)\n"
            "assert torch.allclose(llama_ops.swiglu(x, w.expand(5, 40)), F.silu(x) * w, atol=1e-5)\n"
            "print('ok')\n")
    env = {**os.environ, "SIMPLEGPT_CPU_KERNELS": "portable", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


AARCH64_GCC, QEMU, SYSROOT = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64"), "/usr/aarch64-linux-gnu"


@pytest.mark.skipif(not AARCH64_GCC, reason="no aarch64 cross compiler (Debian: gcc-aarch64-linux-gnu; CI installs it)")
def test_the_llama_kernels_compute_on_aarch64(tmp_path):
    """The portable build for aarch64 (lib.py's own compile step), its Llama kernels checked against
    double-precision references by tests/native/check_llama_kernels.c under qemu-user."""
    target = tmp_path / "kernels-aarch64.so"
    lib._compile(AARCH64_GCC, lib.VARIANTS[-1], target)
    if not (QEMU and os.path.isdir(SYSROOT)):
        pytest.skip("built; no qemu-aarch64 to run it (Debian: qemu-user; CI installs it)")
    check = tmp_path / "check_llama_kernels"
    subprocess.run([AARCH64_GCC, "-O2", "-o", str(check), str(ROOT / "tests" / "native" / "check_llama_kernels.c"),
                    str(target), f"-Wl,-rpath,{tmp_path}", "-lm"], check=True, capture_output=True)
    out = subprocess.run([QEMU, "-L", SYSROOT, str(check)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok (portable)", out.stdout + out.stderr
