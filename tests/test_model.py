"""The GPT-2 model: causality, padding, loss, init, tying, sizes and bad input.

Each check about a defect of the tutorial's code is a function that is run on simplegpt's
model (must pass) and on the tutorial's original model (must fail), so the test can fail.
"""

import contextlib
import math

import pytest
import torch

from conftest import seed_style_config
from seed_reference import SeedSimpleGPT, seed_generate, seed_loss
from simplegpt import GPT, GPTConfig, SimpleDataset, SimpleGPT, generate_text, get_tokenizer, preset_config
from simplegpt.model import IGNORE_INDEX


def logits_of(model, idx, mask=None):
    out = model(idx, attention_mask=mask) if isinstance(model, GPT) else model(idx, mask)
    return out[0] if isinstance(out, tuple) else out


def future_leak(model, with_mask: bool) -> float:
    """Largest change of logits at positions <= t when tokens t+1.. are changed."""
    model.eval()
    V, T, t = model.config.vocab_size, 12, 5
    a = torch.randint(0, V, (2, T))
    b = a.clone()
    b[:, t + 1:] = torch.randint(0, V, (2, T - t - 1))
    mask = torch.ones(2, T, dtype=torch.long) if with_mask else None
    with torch.no_grad():
        la, lb = logits_of(model, a, mask), logits_of(model, b, mask)
    return (la[:, : t + 1] - lb[:, : t + 1]).abs().max().item()


def padding_error(model, side: str) -> float:
    """Largest difference of real-token logits between a padded batch and unpadded sequences."""
    model.eval()
    V = model.config.vocab_size
    seqs = [torch.randint(0, V, (n,)) for n in (9, 5, 7)]
    T = max(len(s) for s in seqs)
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    worst = 0.0
    with torch.no_grad():
        for i, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
            idx[i, sl], mask[i, sl] = s, 1
        batched = logits_of(model, idx, mask)
        for i, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
            alone = logits_of(model, s[None])[0]
            worst = max(worst, (batched[i, sl] - alone).abs().max().item())
    return worst


def ours():
    return GPT(GPTConfig(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4))


def seed():
    return SeedSimpleGPT(seed_style_config())


@pytest.mark.parametrize("with_mask", [False, True])
def test_no_causal_leakage(with_mask):
    assert future_leak(ours(), with_mask) == 0.0


@pytest.mark.parametrize("with_mask", [False, True])
def test_causality_check_fails_on_seed_model(with_mask):
    assert future_leak(seed(), with_mask) > 1e-3


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_unpadded(side):
    assert padding_error(ours(), side) < 1e-5


def test_padding_check_fails_on_seed_model():
    assert padding_error(seed(), "right") > 1e-3


def test_simplegpt_class_is_causal_and_padding_safe():
    model = SimpleGPT(seed_style_config())
    assert future_leak(model, True) == 0.0
    assert padding_error(model, "left") < 1e-5


def test_padding_never_counts_in_loss():
    tok = get_tokenizer("gpt2")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    model.eval()
    text = "I am fine, thank you."
    n = len(tok.encode(text))
    for max_len in (n + 3, n + 10):
        item = SimpleDataset([text], tok, max_length=max_len)[0]
        assert (item["labels"] == IGNORE_INDEX).sum() == max_len - n
    short, long = SimpleDataset([text], tok, n + 3)[0], SimpleDataset([text], tok, n + 10)[0]

    def loss(item):
        ids, mask, labels = (item[k][None] for k in ("input_ids", "attention_mask", "labels"))
        _, l = model(ids[:, :-1], targets=labels[:, 1:], attention_mask=mask[:, :-1])
        return l.item()

    def seed_style(item):
        return seed_loss(lambda i, m: model(i, attention_mask=m)[0], item["input_ids"][None],
                         item["attention_mask"][None]).item()

    assert loss(short) == pytest.approx(loss(long), abs=1e-5)
    # The tutorial's loss counts padding, so the same text gets a different loss with more padding.
    assert abs(seed_style(short) - seed_style(long)) > 1e-3


def test_loss_at_init_is_uniform():
    for V in (65, 257, 50257):
        model = GPT(GPTConfig(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=2))
        idx = torch.randint(0, V, (4, 64))
        _, loss = model(idx, targets=torch.randint(0, V, (4, 64)))
        assert abs(loss.item() - math.log(V)) < 0.1, (V, loss.item())


def test_tiny_model_overfits_one_batch():
    model = GPT(GPTConfig(vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=4))
    idx = torch.randint(0, 64, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_weights_are_tied_and_gpt2_init():
    model = GPT(preset_config("mini", vocab_size=300))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    std = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std - 0.02) < 0.002
    proj = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(proj - 0.02 / math.sqrt(2 * model.config.n_layer)) < 0.002
    seed_model = seed()
    assert seed_model.head.weight.data_ptr() != seed_model.token_embedding.weight.data_ptr()


def test_gpt2_124m_parameter_count():
    with torch.device("meta"):
        model = GPT(preset_config("gpt2"))
    assert model.num_parameters() == 124_439_808


def test_presets_and_flops():
    with torch.device("meta"):
        for name, expected in [("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)]:
            assert GPT(preset_config(name)).num_parameters() == expected
    model = GPT(preset_config("tiny", vocab_size=65))
    assert model.flops_per_token(64) > 6 * model.num_parameters(non_embedding=True)
    assert 0 < model.estimate_mfu(1000.0, 1e12, 64) < 1


def test_crop_block_size():
    model = GPT(GPTConfig(vocab_size=50, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    idx = torch.randint(0, 50, (1, 16))
    before, _ = model(idx)
    model.crop_block_size(16)
    after, _ = model(idx)
    assert model.config.n_positions == 16 and model.transformer.wpe.weight.shape[0] == 16
    assert torch.allclose(before, after)
    with pytest.raises(ValueError, match="exceeds n_positions=16"):
        model(torch.randint(0, 50, (1, 17)))


def test_generate_past_n_positions():
    tok = get_tokenizer("byte")
    model = SimpleGPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    out = generate_text(model, tok, "Once upon a time", max_length=40, device="cpu")
    assert out.startswith("Once upon a time")
    seed_model = SeedSimpleGPT(seed_style_config(vocab_size=257, n_positions=16))
    with pytest.raises(IndexError):
        seed_generate(seed_model, tok.encode("Once upon a time"), max_length=40)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(n_head=0), "n_head"),
        (dict(n_positions=2.5), "n_positions"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_invalid_config_raises_clear_error(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{**dict(vocab_size=50, n_positions=32, n_embd=32, n_layer=1, n_head=2), **kwargs})


def test_bad_forward_input_raises_value_error():
    model = ours()
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[1, 2, 50]]))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="exceeds n_positions"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))


@contextlib.contextmanager
def no_host_reads():
    """Every way a tensor's value becomes a Python object raises inside the block."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("the forward read a tensor's value on the host")

    names = ("item", "tolist", "__int__", "__index__", "__bool__", "__float__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, refuse)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_the_forward_reads_no_tensor_value_with_checks_off():
    """Training with targets, eager inference and a KV-cached decode step, as the trainer and the
    engine run them: no host sync. With checks on (the default) the same forward does read."""
    from simplegpt.engine import Engine, KVCache

    model = ours()
    idx, targets = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    targets[0, :3] = IGNORE_INDEX
    with no_host_reads(), pytest.raises(AssertionError, match="on the host"):
        model(idx, targets)
    model.check_inputs = False
    with no_host_reads():
        _, loss = model(idx, targets)  # training forward
        loss.backward()
        with torch.no_grad():
            logits, _ = model(idx, attention_mask=torch.ones(2, 8, dtype=torch.long))  # eager inference
    assert torch.isfinite(loss) and logits.shape == (2, 8, 50)
    view = Engine(ours()).backend.model  # what the engine runs: its view turns the checks off
    assert not view.check_inputs
    cache = KVCache(view.config, 2, 16)
    with torch.no_grad():
        view(idx, kv_cache=cache)  # prefill
        with no_host_reads():
            step, _ = view(idx[:, -1:], kv_cache=cache)  # one decode step
    assert step.shape == (2, 1, 50) and cache.length == 9
