"""The layers' boundaries: a plain model, and the CPU kernels applied to it from outside."""

import ast
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import ROOT, make_tiny_gpt
from simplegpt.accel import cpu
from simplegpt.accel.cpu import modules, training
from simplegpt.model import GPT

if not cpu.enabled() and os.environ.get("CI") and os.environ.get("SIMPLEGPT_NATIVE", "1") != "0":
    raise RuntimeError(f"the CPU kernels must build in CI: {cpu.unavailable_reason()}")
needs_kernels = pytest.mark.skipif(not cpu.enabled(), reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_the_file_that_defines_gpt_imports_nothing_of_the_kernels():
    path = ROOT / "simplegpt" / "model.py"
    assert "class GPT(" in path.read_text(encoding="utf-8")
    imports = imported_modules(path)
    assert imports <= {"__future__", "dataclasses", "math", "typing", "torch", "torch.nn", "torch.nn.functional"}, imports
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not {n for n in names if "native" in n or "accel" in n}  # no branch into kernels by any name


def state(model: nn.Module) -> list:
    """Everything a caller could see change: classes, parameter identity, values and strides, flags."""
    return ([(name, type(m), m.training) for name, m in model.named_modules()]
            + [(name, id(p), p.stride(), p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()])


def same_state(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        all(torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v for u, v in zip(x, y)) for x, y in zip(a, b))


@needs_kernels
def test_for_training_shares_the_parameters_and_leaves_the_model_as_it_was():
    model = make_tiny_gpt(jitter=0.1, n_embd=64, n_head=4)
    before = state(model)
    twin = cpu.for_training(model)
    assert twin is not model and type(twin) is modules.FusedGPT
    assert same_state(before, state(model))
    assert [id(p) for p in twin.parameters()] == [id(p) for p in model.parameters()]
    assert list(twin.state_dict()) == list(model.state_dict())
    assert type(twin.transformer.h[0].mlp.gelu) is modules.GELU and type(model.transformer.h[0].mlp.gelu) is nn.GELU
    twin.eval()
    assert model.training and twin.transformer.h[0].training is False


@needs_kernels
@pytest.mark.parametrize("path", ["model_loss", "block", "ops"])
def test_a_step_through_the_twin_gives_the_plain_models_loss_and_gradients(path, monkeypatch):
    model = make_tiny_gpt(jitter=0.1, n_embd=64, n_head=4)
    reference = copy.deepcopy(model)
    idx, targets = torch.randint(0, 50, (3, 20)), torch.randint(0, 50, (3, 20))
    calls = []
    for name in ("model_loss", "block", "gelu", "causal_attention", "layer_norm"):
        real = getattr(training, name)
        monkeypatch.setattr(training, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    if path != "model_loss":
        monkeypatch.setattr(training, "model_usable", lambda *a: False)
    if path == "ops":
        monkeypatch.setattr(training, "block_usable", lambda *a: False)
    loss = cpu.for_training(model).loss(idx, targets)
    loss.backward()
    ref = reference.loss(idx, targets)
    ref.backward()
    assert {"model_loss": ["model_loss"], "block": ["block", "block", "layer_norm"],
            "ops": ["layer_norm", "causal_attention", "layer_norm", "gelu"] * 2 + ["layer_norm"]}[path] == calls
    assert abs(loss.item() - ref.item()) < 1e-5
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def test_plain_model_runs_no_kernel(monkeypatch):
    calls = []
    for name in ("model_loss", "block", "gelu", "causal_attention", "layer_norm"):
        monkeypatch.setattr(training, name, lambda *a, _n=name: calls.append(_n))
    model = make_tiny_gpt(n_embd=64, n_head=4)
    model.loss(torch.randint(0, 50, (2, 10)), torch.randint(0, 50, (2, 10))).backward()
    assert calls == []


def test_disabled_switches_the_kernels_off_for_the_block():
    model = make_tiny_gpt()
    with cpu.disabled():
        assert not cpu.enabled() and "disabled()" in cpu.unavailable_reason()
        assert cpu.for_training(model) is model
    assert cpu.enabled() == (cpu.load() is not None)


def test_for_training_leaves_what_it_cannot_take_alone():
    class Wrapped(GPT):
        pass

    model = make_tiny_gpt()
    wrapped = Wrapped(model.config)
    assert cpu.for_training(wrapped) is wrapped
    assert cpu.for_training(model.double()) is not None  # fp64 parameters: a twin whose kernels step aside
    assert cpu.for_training(nn.Linear(2, 2)).__class__ is nn.Linear


def test_the_environment_switch_turns_the_kernels_off_for_the_process():
    code = "from simplegpt.accel import cpu; print(cpu.enabled(), cpu.unavailable_reason())"
    env = {**os.environ, "SIMPLEGPT_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["False", "SIMPLEGPT_NATIVE=0"], out.stderr
