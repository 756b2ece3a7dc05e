"""The native AdamW step with gradient clipping (simplegpt.native.training.adamw_step, train.c)."""

import copy
import json
import math
import os

import pytest
import torch

from simplegpt import GPT, GPTConfig
from simplegpt.accel.cpu import decode as native
from simplegpt.accel.cpu import training

lib = native.load()
if lib is None and os.environ.get("CI"):
    raise RuntimeError(f"the native kernels must build in CI: {native.unavailable_reason()}")
pytestmark = pytest.mark.skipif(lib is None, reason=f"native kernels unavailable: {native.unavailable_reason()}")


def model_and_optimizer(**kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=51, n_positions=16, n_embd=36, n_layer=2, n_head=2))  # tails of 4 floats
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return model, torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), **kw)


def set_grads(models, step):
    """The same random gradients for every model; odd steps are large enough to be clipped."""
    gen = torch.Generator().manual_seed(step)
    for params in zip(*(m.parameters() for m in models)):
        g = torch.randn(params[0].shape, generator=gen, dtype=params[0].dtype) * (3.0 if step % 2 else 0.01)
        for p in params:
            p.grad = g.clone()


def torch_step(model, opt, max_norm):
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)) if max_norm > 0 else math.nan
    opt.step()
    return norm


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_step_equals_clip_grad_norm_and_torch_adamw(fused, max_norm):
    ours, opt = model_and_optimizer(fused=fused)
    ref, ref_opt = model_and_optimizer(fused=fused)
    for step in range(6):
        lr = 1e-2 * (step + 1) / 6  # the schedule changes lr between steps
        for o in (opt, ref_opt):
            for g in o.param_groups:
                g["lr"] = lr
        set_grads([ours, ref], step)
        norm = training.adamw_step(opt, max_norm, 2)
        want = torch_step(ref, ref_opt, max_norm)
        if max_norm > 0:
            assert norm == pytest.approx(want, rel=1e-5)
        else:
            assert math.isnan(norm)
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)
    for p, q in zip(ours.parameters(), ref.parameters()):
        st, rt = opt.state[p], ref_opt.state[q]
        assert float(st["step"]) == float(rt["step"]) == 6
        torch.testing.assert_close(st["exp_avg"], rt["exp_avg"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(st["exp_avg_sq"], rt["exp_avg_sq"], atol=1e-8, rtol=1e-5)


def test_state_dict_round_trips_between_the_native_step_and_torch():
    """A checkpoint of native steps resumes in PyTorch's AdamW and the other way round."""
    a, opt_a = model_and_optimizer()
    for step in range(3):
        set_grads([a], step)
        training.adamw_step(opt_a, 1.0, 1)
    b, opt_b = model_and_optimizer()
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as from a checkpoint file
    c = copy.deepcopy(a)
    for step in range(3, 6):
        set_grads([a, b], step)
        training.adamw_step(opt_a, 1.0, 2)
        torch_step(b, opt_b, 1.0)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)
    # and back: torch's state loaded into the optimizer the native step already ran on (new state tensors)
    opt_a.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    a.load_state_dict(b.state_dict())
    set_grads([a, b], 6)
    training.adamw_step(opt_a, 1.0, 2)
    torch_step(b, opt_b, 1.0)
    for p, q, r in zip(a.parameters(), b.parameters(), c.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)
        assert not torch.equal(p, r)


def test_same_bits_on_any_thread_count():
    results = []
    for threads in (1, 2, 3):
        m, opt = model_and_optimizer()
        norms = []
        for step in range(3):
            set_grads([m], step)
            norms.append(training.adamw_step(opt, 0.5, threads))
        results.append((norms, [p.detach().clone() for p in m.parameters()]))
    for norms, params in results[1:]:
        assert norms == results[0][0]
        assert all(torch.equal(p, q) for p, q in zip(params, results[0][1]))


@pytest.mark.parametrize("case", ["amsgrad", "sgd", "float64", "tensor_lr"])
def test_optimizers_it_does_not_take_are_left_alone(case):
    if case == "amsgrad":
        m, opt = model_and_optimizer(amsgrad=True)
    elif case == "sgd":
        m, _ = model_and_optimizer()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
    elif case == "float64":
        m, _ = model_and_optimizer()
        m.double()
        opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    else:
        m, opt = model_and_optimizer()
        for g in opt.param_groups:
            g["lr"] = torch.tensor(0.01)
    set_grads([m], 1)
    before = [p.detach().clone() for p in m.parameters()]
    assert training.adamw_step(opt, 1.0, 2) is None
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))


def test_parameters_without_gradients_are_skipped_as_torch_skips_them():
    ours, opt = model_and_optimizer()
    ref, ref_opt = model_and_optimizer()
    set_grads([ours, ref], 0)
    for m in (ours, ref):
        m.transformer.wpe.weight.grad = None
    training.adamw_step(opt, 1.0, 2)
    torch_step(ref, ref_opt, 1.0)
    assert ours.transformer.wpe.weight not in opt.state or not opt.state[ours.transformer.wpe.weight]
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_the_trainer_steps_with_it_unless_fused_is_off(tmp_path, shakespeare_path, monkeypatch, fused):
    from simplegpt.config import TrainConfig
    from simplegpt.trainer import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_path.read_text()[:20_000])
    calls, real = [], training.adamw_step
    monkeypatch.setattr(training, "adamw_step", lambda *a: calls.append(a[1:]) or real(*a))
    cfg = TrainConfig(data=str(corpus), data_dir=str(tmp_path / "data"), n_layer=1, n_head=2, n_embd=16,
                      block_size=16, batch_size=4, max_iters=4, eval_interval=4, eval_iters=1, sample_tokens=0,
                      warmup_iters=0, num_threads=2, grad_clip=0.5, fused=fused, plot=False, tensorboard=False,
                      peak_flops=1e12, out_dir=str(tmp_path / "run"))  # no warmup: 4 steps at lr lower the loss
    result = train(cfg, progress=False, log=lambda s: None)
    assert len(calls) == (4 if fused else 0)
    assert all(c == (0.5, 1) for c in calls)  # one thread inside a split step
    assert result.losses[-1] < result.losses[0]
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in records if r["kind"] == "train")
