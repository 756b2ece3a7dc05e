"""Llama-style options under torchrun on 2 gloo ranks: DDP and FSDP2 give the one-process run's losses."""

import sys

import pytest

from test_distributed import _finish, _losses, _reference, _same, _settings, _torchrun
from test_distributed import work  # noqa: F401 (the fixture: a corpus and its prepared data)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun on gloo, as test_distributed")

OPTIONS = {
    "llama": dict(positions="rotary", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False),
    "nanochat-untied": dict(positions="rotary", norm="rmsnorm", norm_gain=False, mlp="relu2", n_kv_head=1,
                            qk_norm=True, bias=False, tie_word_embeddings=False),
}


@pytest.mark.parametrize("parallel, name", [("ddp", "nanochat-untied"), ("fsdp", "llama"), ("fsdp", "nanochat-untied")])
def test_two_ranks_equal_one_process(work, parallel, name):
    settings = _settings(work, f"{parallel}_{name}", max_iters=6, eval_interval=6, parallel=parallel,
                         **OPTIONS[name])
    out = _finish(_torchrun(work, settings))
    assert "this is a bug" not in out, out[-3000:]
    reference = _reference(work, settings, f"{parallel}_{name}_ref")
    _same(_losses(work / f"{parallel}_{name}"), dict(enumerate(reference.losses, start=1)), range(1, 7))


def test_a_sharded_checkpoint_keeps_an_untied_head_through_load_and_consolidate(tmp_path):
    """save_sharded / load_sharded / consolidate in one process without a process group (as DCP allows):
    an untied lm_head.weight is its own tensor in dcp/, not the embedding's."""
    import torch

    from conftest import make_tiny_gpt
    from simplegpt.checkpoint import load_checkpoint, save_checkpoint
    from simplegpt.training import fsdp

    untied = dict(OPTIONS["nanochat-untied"], vocab_size=40)
    model = make_tiny_gpt(seed=0, **untied)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), targets=torch.tensor([[2, 3, 4]]))[1].backward()
    optimizer.step()
    save_checkpoint(tmp_path / "sharded", model, write_weights=lambda tmp: fsdp.save_sharded(tmp, model, optimizer))
    other = make_tiny_gpt(seed=1, **untied)
    fsdp.load_sharded(tmp_path / "sharded", other, torch.optim.AdamW(other.parameters(), lr=1e-3))
    plain = load_checkpoint(fsdp.consolidate(tmp_path / "sharded", tmp_path / "plain")).model
    for loaded in (other, plain):
        assert loaded.lm_head.weight is not loaded.transformer.wte.weight
        for name, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value), name
