"""The engine never changes a model it was handed: generate_text(model, ...) and Engine(model)
leave its module classes, attributes, parameters (objects, values, strides), training flag and
later training steps exactly as an untouched copy's, whichever backend runs it."""

import copy

import pytest
import torch
import torch.nn as nn

from simplegpt import generate_text, get_tokenizer
from simplegpt.accel import cpu
from simplegpt.engine import Engine, SamplingParams
from simplegpt.quantize import quantize_int8

from conftest import make_tiny_gpt

GREEDY = SamplingParams(max_new_tokens=40, temperature=0.0, stop_at_eos=False)
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11]]


def snapshot(model: nn.Module) -> dict:
    """Everything a caller could notice about a model: per module its class, training flag and
    attribute names; per parameter and buffer the object, its values, strides and storage."""
    return {
        "modules": [(name, type(m), m.training, sorted(vars(m))) for name, m in model.named_modules()],
        "tensors": [(name, id(t), t.detach().clone(), t.stride(), t.data_ptr())
                    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]],
        "tied": getattr(model.lm_head, "weight", None) is model.transformer.wte.weight,
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["tied"] == before["tied"]
    for (name, *was), (_, *now) in zip(before["tensors"], after["tensors"], strict=True):
        assert now[0] == was[0], f"{name} is another object"
        assert torch.equal(now[1], was[1]), f"{name} changed values"
        assert now[2:] == was[2:], f"{name} changed layout (strides, storage)"


def assert_trains_like(model: nn.Module, twin: nn.Module) -> None:
    """A training step (forward, loss, backward, AdamW) gives bit-identical gradients and weights."""
    idx = torch.randint(0, model.config.vocab_size, (4, 17), generator=torch.Generator().manual_seed(1))
    results = []
    for m in (model, twin):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        torch.manual_seed(2)  # the same dropout masks
        m(idx[:, :-1], targets=idx[:, 1:])[1].backward()
        grads = [p.grad.clone() for p in m.parameters()]
        opt.step()
        results.append((grads, [p.detach().clone() for p in m.parameters()]))
    (g1, w1), (g2, w2) = results
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True)), "gradients differ from the untouched copy's"
    assert all(torch.equal(a, b) for a, b in zip(w1, w2, strict=True))


def fresh(dropout: float = 0.1):
    """A model in training mode (as a user's is after building or training it), with dropout, and its twin."""
    model = make_tiny_gpt(scale=8.0, vocab_size=257, n_positions=16, dropout=dropout).train()
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("kernels", [True, False], ids=["native", "eager"])
def test_engine_leaves_the_model_as_it_was(kernels):
    if kernels and not cpu.enabled():
        pytest.skip(f"the CPU kernels are unavailable here: {cpu.unavailable_reason()}")
    model, twin = fresh()
    before = snapshot(model)
    with cpu.disabled() if not kernels else torch.no_grad():
        engine = Engine(model)
    assert engine.backend.name == ("native" if kernels else "eager")
    got = [r.token_ids for r in engine.generate(PROMPTS, GREEDY)]
    engine.score(PROMPTS, top=2)
    assert_unchanged(model, before)
    # The engine runs without dropout whatever the caller's model's mode: the tokens of the model in eval mode.
    assert got == [r.token_ids for r in Engine(copy.deepcopy(twin).eval(), use_cache=False).generate(PROMPTS, GREEDY)]
    assert_trains_like(model, twin)


def test_generate_text_leaves_the_model_as_it_was():
    tok = get_tokenizer("byte")
    model, twin = fresh()
    before = snapshot(model)
    out = generate_text(model, tok, "Once upon a time", max_length=40, device="cpu")
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time")
    assert_unchanged(model, before)
    assert_trains_like(model, twin)


def test_engine_on_an_int8_model_leaves_its_layers_as_they_were():
    model = make_tiny_gpt(scale=1.0, vocab_size=257, n_positions=16)
    quantize_int8(model)
    before = snapshot(model)
    layers = {name: (type(m), sorted(vars(m))) for name, m in model.named_modules()}
    Engine(model).generate(PROMPTS, GREEDY)
    assert_unchanged(model, before)
    assert {name: (type(m), sorted(vars(m))) for name, m in model.named_modules()} == layers


def test_the_engine_reads_the_models_parameters_not_copies():
    """The backend's view shares the model's Parameter objects: an in-place update (an optimizer
    step) is what the same Engine generates from next."""
    model = make_tiny_gpt(scale=8.0, vocab_size=257, n_positions=16).eval()
    engine = Engine(model)
    first = [r.token_ids for r in engine.generate(PROMPTS, GREEDY)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    now = [r.token_ids for r in engine.generate(PROMPTS, GREEDY)]
    assert now == [r.token_ids for r in Engine(copy.deepcopy(model)).generate(PROMPTS, GREEDY)]
    assert now != first
