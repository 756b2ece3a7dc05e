"""The trainer's optimizer: one clip_and_step for every run, the native AdamW equal to PyTorch's
AdamW + clip_grad_norm_, and state_dicts that stay PyTorch's own."""

import contextlib
import copy
import math

import pytest
import torch

from conftest import make_tiny_gpt
from simplegpt.accel import cpu
from simplegpt.accel.cpu import training
from simplegpt.accel.cpu.optim import AdamW
from simplegpt.config import TrainConfig
from simplegpt.errors import ConfigError
from simplegpt.training.optimizer import ScaledAdamW, make_optimizer, param_groups

needs_kernels = pytest.mark.skipif(not cpu.enabled(), reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}")


def groups(model):
    return param_groups(model, 0.1, decay_embeddings=False)


def set_grads(models, step):
    """The same random gradients for every model; odd steps are large enough to be clipped."""
    gen = torch.Generator().manual_seed(step)
    for params in zip(*(m.parameters() for m in models)):
        g = torch.randn(params[0].shape, generator=gen) * (3.0 if step % 2 else 0.01)
        for p in params:
            p.grad = g.clone()


def reference_step(opt, max_norm):
    """What the loop ran before clip_and_step: clip_grad_norm_, then PyTorch's AdamW step."""
    params = [p for g in opt.param_groups for p in g["params"]]
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if max_norm > 0 else math.nan
    opt.step()
    return norm


def run_steps(model, opt, steps, max_norm, first=0):
    norms = []
    for step in range(first, first + steps):
        for g in opt.param_groups:
            g["lr"] = 1e-2 * (step + 1) / steps  # the schedule changes lr between steps
        set_grads([model], step)
        norms.append(opt.clip_and_step(max_norm) if hasattr(opt, "clip_and_step") else reference_step(opt, max_norm))
        opt.zero_grad(set_to_none=True)
    return norms


@needs_kernels
@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_native_adamw_equals_torch_adamw_and_clip_grad_norm_step_for_step(max_norm, monkeypatch):
    taken, real = [], training.adamw_step
    monkeypatch.setattr(training, "adamw_step", lambda *a: taken.append(real(*a)) or taken[-1])
    ours, ref = make_tiny_gpt(), make_tiny_gpt()
    opt = AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95))
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.95))
    assert isinstance(opt, torch.optim.AdamW)
    for step in range(6):
        [norm] = run_steps(ours, opt, 1, max_norm, first=step)
        [want] = run_steps(ref, ref_opt, 1, max_norm, first=step)
        assert norm == pytest.approx(want, rel=1e-5) if max_norm else math.isnan(norm) and math.isnan(want)
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)
    assert len(taken) == 6 and all(t is not None for t in taken)  # every step ran in the kernels
    assert not any(torch.equal(p, q) for p, q in zip(ours.parameters(), make_tiny_gpt().parameters()))


def test_without_the_kernels_it_is_exactly_torch():
    ours, ref = make_tiny_gpt(), make_tiny_gpt()
    opt = AdamW(groups(ours), lr=1e-2)
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2)
    with cpu.disabled():
        norms = run_steps(ours, opt, 4, 1.0)
    assert norms == run_steps(ref, ref_opt, 4, 1.0)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), ref.parameters()))


def test_state_dict_round_trips_through_plain_torch_adamw():
    a = make_tiny_gpt()
    opt_a = AdamW(groups(a), lr=1e-2, betas=(0.9, 0.95))
    run_steps(a, opt_a, 3, 1.0)
    saved = copy.deepcopy(opt_a.state_dict())  # as from a checkpoint file
    b = copy.deepcopy(a)
    opt_b = torch.optim.AdamW(groups(b), lr=1e-2, betas=(0.9, 0.95))
    opt_b.load_state_dict(saved)  # PyTorch's own format: the plain optimizer takes it as it is
    assert opt_b.state_dict()["param_groups"] == saved["param_groups"]
    run_steps(a, opt_a, 3, 1.0, first=3)
    run_steps(b, opt_b, 3, 1.0, first=3)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)
    # and back: torch's state into a new native optimizer
    c = copy.deepcopy(b)
    opt_c = AdamW(groups(c), lr=1e-2, betas=(0.9, 0.95))
    opt_c.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    run_steps(b, opt_b, 1, 1.0, first=6)
    run_steps(c, opt_c, 1, 1.0, first=6)
    for p, q in zip(b.parameters(), c.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)
    assert float(opt_c.state[next(iter(c.parameters()))]["step"]) == 7


def test_step_alone_is_adamw_without_clipping():
    ours, ref = make_tiny_gpt(), make_tiny_gpt()
    opt, ref_opt = AdamW(groups(ours), lr=1e-2), torch.optim.AdamW(groups(ref), lr=1e-2)
    for step in range(3):
        set_grads([ours, ref], step)
        opt.step()
        ref_opt.step()
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kw,scaled,want", [
    ({}, False, AdamW),
    ({"fused": False}, False, ScaledAdamW),
    ({}, True, ScaledAdamW),  # a loss-scaled (fp16) run: never the native step
])
def test_every_run_gets_one_clip_and_step(kw, scaled, want):
    model = make_tiny_gpt()
    scaler = torch.amp.GradScaler("cpu", enabled=scaled)
    opt = make_optimizer(model, TrainConfig(**kw), torch.device("cpu"), scaler)
    assert type(opt) is want and isinstance(opt, torch.optim.AdamW) and callable(opt.clip_and_step)


def test_the_scaled_step_unscales_before_clipping():
    """fp16's path, on the CPU: the loss scaled by 2^10, the step equal to the unscaled one."""
    ours, ref = make_tiny_gpt(), make_tiny_gpt()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = ScaledAdamW(groups(ours), scaler, lr=1e-2)
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2)
    x = torch.randint(0, 50, (2, 16))
    scaler.scale(ours.loss(x, x)).backward()
    ref.loss(x, x).backward()
    assert ours.transformer.wte.weight.grad.abs().max() > 100 * ref.transformer.wte.weight.grad.abs().max()
    norm = opt.clip_and_step(0.5)
    assert norm == pytest.approx(reference_step(ref_opt, 0.5), rel=1e-5)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["native", "native_kernels_off", "scaled"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_gradient_norm_is_returned_and_never_applied(kind, bad):
    # clipping by an infinite norm multiplies every gradient by 0 (inf * 0 = NaN), so a step taken
    # anyway turns the weights into NaN
    if kind == "native" and not cpu.enabled():
        pytest.skip(f"CPU kernels unavailable: {cpu.unavailable_reason()}")
    model = make_tiny_gpt()
    make = {"native": AdamW, "native_kernels_off": AdamW,
            "scaled": lambda g, **kw: ScaledAdamW(g, torch.amp.GradScaler("cpu", enabled=False), **kw)}[kind]
    opt = make(groups(model), lr=1e-2, fused=True)
    run_steps(model, opt, 2, 1.0)  # a state to keep
    before = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    set_grads([model], 2)
    next(model.parameters()).grad[0, 0] = bad
    with cpu.disabled() if kind == "native_kernels_off" else contextlib.nullcontext():
        norm = opt.clip_and_step(1.0)
    assert not math.isfinite(norm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[i][k], s[k]) for i, s in state["state"].items() for k in s)
    opt.zero_grad(set_to_none=True)
    assert all(math.isfinite(n) for n in run_steps(model, opt, 2, 1.0, first=3))  # and it goes on from there


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("scaled", [False, True])
def test_a_cuda_run_gets_torch_s_fused_adamw_through_its_scaler(fused, scaled):
    """make_optimizer's CUDA choice (this torch checks a fused optimizer's devices at its first step,
    so the choice can be read here without a GPU): PyTorch's fused kernel when asked, bf16 or fp16."""
    scaler = torch.amp.GradScaler("cpu", enabled=scaled)  # a CUDA one disables itself on a machine without CUDA
    opt = make_optimizer(make_tiny_gpt(), TrainConfig(fused=fused), torch.device("cuda"), scaler)
    assert type(opt) is ScaledAdamW and opt.scaler is scaler
    assert all(bool(g["fused"]) is fused for g in opt.param_groups)
    assert getattr(opt, "_step_supports_amp_scaling", False) is fused  # the scaler hands the kernel its scale


@pytest.mark.parametrize("max_norm", [0.0, 0.5])
def test_the_fused_kernel_under_a_grad_scaler_steps_as_unscaled_adamw_and_skips_inf(max_norm):
    """fp16's path with PyTorch's fused AdamW, on the CPU's fused kernel: with clipping the scaler
    unscales first; without, the kernel divides by the scale itself. A non-finite gradient is skipped
    and lowers the scale."""
    ours, ref = make_tiny_gpt(), make_tiny_gpt()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = ScaledAdamW(groups(ours), scaler, lr=1e-2, fused=True)
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2)
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    scaler.scale(ours.loss(x, x)).backward()
    ref.loss(x, x).backward()
    norm = opt.clip_and_step(max_norm)
    want = reference_step(ref_opt, max_norm)
    assert norm == pytest.approx(want, rel=1e-5) if max_norm else math.isnan(norm)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    opt.zero_grad(set_to_none=True)
    before = copy.deepcopy(ours.state_dict())
    scaler.scale(ours.loss(x, x)).backward()
    next(ours.parameters()).grad[0, 0] = math.inf
    opt.clip_and_step(max_norm)
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())
    assert scaler.get_scale() == 2.0**9


def test_muons_adamw_half_runs_at_its_lr_ratio_and_muon_at_its_momentum(tmp_path, shakespeare_path):
    """adamw_lr_ratio: the loop sets the AdamW groups (embeddings, head, norms, biases) to the schedule's lr
    times the ratio at every step, the Muon group to the lr itself; muon_momentum is torch.optim.Muon's."""
    from simplegpt.checkpoint import load_train_state
    from simplegpt.training.loop import train

    cfg = TrainConfig(data=str(shakespeare_path), data_dir=str(tmp_path / "data"), n_layer=1, n_head=2, n_embd=16,
                      block_size=16, batch_size=2, max_iters=4, eval_interval=4, eval_iters=1, sample_tokens=0,
                      out_dir=str(tmp_path / "run"), num_threads=1, plot=False, tensorboard=False, optimizer="muon",
                      schedule="wsd", warmup_iters=1, decay_fraction=1.0, lr=1e-2, min_lr=1e-3,
                      adamw_lr_ratio=3.0, muon_momentum=0.8)
    train(cfg, progress=False)
    groups = load_train_state(tmp_path / "run" / "last")["optimizer"]["param_groups"]
    muon, adamw = [g for g in groups if g["optimizer"] == "muon"], [g for g in groups if g["optimizer"] == "adamw"]
    assert [g["momentum"] for g in muon] == [0.8] and adamw
    # the last step runs at min_lr: Muon's group at it, AdamW's at 3 x it
    assert [g["lr"] for g in muon] == [pytest.approx(1e-3)]
    assert [g["lr"] for g in adamw] == [pytest.approx(3e-3)] * len(adamw)
    with pytest.raises(ConfigError, match="adamw_lr_ratio"):
        TrainConfig(adamw_lr_ratio=0.0)
    with pytest.raises(ConfigError, match="muon_momentum"):
        TrainConfig(muon_momentum=1.0)
