"""The whole-model training pass of a model with the Llama-style options (csrc/llama_model.c through
simplegpt.accel.cpu.llama_model): the training twin's loss() takes it for every option combination
it covers, with the plain model's loss and gradients, the same bits on any thread count; the
combinations and steps it does not cover keep the op-by-op path and still match."""

import math
import os

import pytest
import torch

from conftest import make_tiny_gpt, use_kernel_variant
from simplegpt.accel import cpu
from simplegpt.accel.cpu import lib, llama_model, modules
from simplegpt.model import IGNORE_INDEX

if lib.load() is None and os.environ.get("CI"):
    raise RuntimeError(f"the CPU kernels must build in CI: {lib.unavailable_reason()}")
pytestmark = pytest.mark.skipif(lib.load() is None, reason=f"CPU kernels unavailable: {lib.unavailable_reason()}")

LLAMA = dict(positions="rotary", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2)
# The covered combinations: every option's every value at least once, most of them together with
# others (n_embd 64, 4 heads: head size 16 unless head_size says otherwise)
COVERED = {
    "llama_gqa": LLAMA,
    "qwen3_qk_norm_untied": dict(LLAMA, qk_norm=True, tie_word_embeddings=False, head_size=32),
    "nanochat_no_gains": dict(LLAMA, mlp="relu2", norm_gain=False, qk_norm=True, n_kv_head=1,
                              tie_word_embeddings=False),
    "learned_layernorm_gelu_gqa": dict(positions="learned", norm="layernorm", mlp="gelu", bias=True, n_kv_head=2,
                                       qk_norm=True),
    "learned_rmsnorm_gelu_bias": dict(positions="learned", norm="rmsnorm", mlp="gelu", bias=True,
                                      tie_word_embeddings=False),
    "rotary_layernorm_swiglu_bias": dict(positions="rotary", norm="layernorm", mlp="swiglu", bias=True,
                                         intermediate_size=96),
    "learned_layernorm_relu2_no_bias": dict(positions="learned", norm="layernorm", mlp="relu2", bias=False,
                                            n_head=8, n_kv_head=4, tie_word_embeddings=False),
    "rotary_rmsnorm_swiglu_bias_qk": dict(LLAMA, bias=True, qk_norm=True, n_kv_head=4),
}


def llama_gpt(**options):
    """make_tiny_gpt of 64 wide, 4 heads, vocabulary 50, window 32, with every weight jittered (no zero
    biases or unit gains, as after some training)."""
    return make_tiny_gpt(seed=0, jitter=0.1, **{"vocab_size": 50, "n_embd": 64, "n_head": 4, **options})


def batch(B=3, T=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx, targets = torch.randint(0, 50, (B, T), generator=g), torch.randint(0, 50, (B, T), generator=g)
    targets[0, : T // 2] = IGNORE_INDEX  # padding-like targets take no loss
    targets[2, -1] = IGNORE_INDEX
    return idx, targets


def loss_and_grads(module, model, idx, targets, **kw):
    model.zero_grad(set_to_none=True)
    loss = module.loss(idx, targets, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def calls(monkeypatch):
    """The whole-model passes taken (one entry per call of llama_model.loss)."""
    seen, real = [], llama_model.loss
    monkeypatch.setattr(llama_model, "loss", lambda *a: seen.append(a[1].shape) or real(*a))
    return seen


def assert_matches(loss, grads, ref_loss, ref_grads):
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("options", COVERED.values(), ids=COVERED.keys())
def test_the_whole_model_pass_gives_the_plain_models_loss_and_gradients(options, calls):
    model = llama_gpt(**options)
    assert not model.config.is_gpt2
    twin = cpu.for_training(model)
    assert type(twin) is modules.LlamaGPT
    idx, targets = batch()
    loss, grads = loss_and_grads(twin, model, idx, targets)
    assert calls == [idx.shape]
    ref_loss, ref_grads = loss_and_grads(model, model, idx, targets)  # the plain model.GPT, PyTorch's ops
    assert_matches(loss, grads, ref_loss, ref_grads)


@pytest.mark.parametrize("T", [2, 32])
def test_the_shortest_and_the_longest_window(T, calls):
    model = llama_gpt(**COVERED["qwen3_qk_norm_untied"])
    idx, targets = batch(T=T)
    loss, grads = loss_and_grads(cpu.for_training(model), model, idx, targets)
    assert calls == [idx.shape]
    assert_matches(loss, grads, *loss_and_grads(model, model, idx, targets))


@pytest.mark.parametrize("variant", lib.VARIANT_NAMES)
def test_every_build_of_the_kernels_takes_the_pass(variant, calls, monkeypatch):
    use_kernel_variant(variant, monkeypatch)
    model = llama_gpt(**COVERED["rotary_rmsnorm_swiglu_bias_qk"])
    idx, targets = batch()
    loss, grads = loss_and_grads(cpu.for_training(model), model, idx, targets)
    assert calls == [idx.shape]
    assert_matches(loss, grads, *loss_and_grads(model, model, idx, targets))


def test_the_same_bits_on_any_thread_count(calls):
    """Exact resume and DDP == one process need the step's bits independent of the threads."""
    results, saved = [], torch.get_num_threads()
    try:
        for name in ("qwen3_qk_norm_untied", "learned_layernorm_gelu_gqa"):
            model = llama_gpt(**COVERED[name])
            twin = cpu.for_training(model)
            idx, targets = batch(B=8, T=32)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                results.append((threads, *loss_and_grads(twin, model, idx, targets)))
    finally:
        torch.set_num_threads(saved)
    assert len(calls) == 4
    for (_, loss1, grads1), (_, loss2, grads2) in (results[:2], results[2:]):
        assert torch.equal(loss1, loss2) and all(torch.equal(grads1[n], grads2[n]) for n in grads1)


def test_frozen_weights_get_no_gradients(calls):
    model = llama_gpt(**COVERED["qwen3_qk_norm_untied"])
    frozen = [model.transformer.wte.weight, model.transformer.h[0].attn.q_norm.weight,
              model.transformer.h[1].mlp.c_fc.weight, model.transformer.ln_f.weight]
    for p in frozen:
        p.requires_grad_(False)
    idx, targets = batch()
    loss, grads = loss_and_grads(cpu.for_training(model), model, idx, targets)
    assert calls and all(p.grad is None for p in frozen)
    assert_matches(loss, grads, *loss_and_grads(model, model, idx, targets))


@pytest.mark.parametrize("case", ["layernorm_without_gain", "head_size_24", "dropout", "mask", "no_grad", "long",
                                  "lora"])
def test_what_the_pass_does_not_cover_keeps_the_op_path_and_matches(case, calls):
    options = dict(COVERED["qwen3_qk_norm_untied"], n_positions=300 if case == "long" else 32)
    options.update({"layernorm_without_gain": dict(norm="layernorm", norm_gain=False),
                    "head_size_24": dict(head_size=24), "dropout": dict(dropout=0.1)}.get(case, {}))
    model = llama_gpt(**options)
    if case == "lora":
        from simplegpt.config import TrainConfig
        from simplegpt.training import lora

        lora.add_adapters(model, TrainConfig(lora=2, lora_targets="attn,mlp", init_from="x"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)  # the adapters matter
    twin = cpu.for_training(model)
    idx, targets = batch(T=257 if case == "long" else 17)
    if case == "no_grad":
        with torch.no_grad():
            assert abs(float(twin.loss(idx, targets)) - float(model.loss(idx, targets))) < 1e-5
    elif case == "dropout":
        assert math.isfinite(twin.loss(idx, targets).item())
    else:
        kw = {"attention_mask": torch.ones_like(idx)} if case == "mask" else {}
        assert_matches(*loss_and_grads(twin, model, idx, targets, **kw), *loss_and_grads(model, model, idx, targets,
                                                                                        **kw))
    assert calls == []


def test_a_target_outside_the_vocabulary_is_refused():
    idx, targets = batch()
    targets[1, 3] = 50
    with pytest.raises(ValueError, match="target token ids must be in 0..49"):
        cpu.for_training(llama_gpt(**LLAMA)).loss(idx, targets)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_trainer_takes_the_whole_model_pass(tmp_path, shakespeare_path, calls, threads):
    """Alone and in each share of a split step (2 threads: one C call per share)."""
    from simplegpt.config import TrainConfig
    from simplegpt.training.loop import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_path.read_text()[:20_000])
    cfg = TrainConfig(data=str(corpus), data_dir=str(tmp_path / "data"), n_layer=1, n_head=2, n_kv_head=1,
                      n_embd=32, positions="rotary", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True,
                      block_size=16, batch_size=4, max_iters=3, eval_interval=3, eval_iters=1, sample_tokens=0,
                      num_threads=threads, plot=False, tensorboard=False, peak_flops=1e12,
                      out_dir=str(tmp_path / "run"))
    result = train(cfg, progress=False, log=lambda s: None)
    assert calls == [(4 // threads, 16)] * 3 * threads
    assert all(math.isfinite(x) for x in result.losses)
