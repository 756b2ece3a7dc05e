"""Llama-style options under torchrun on 2 gloo ranks: DDP and FSDP2 give the one-process run's losses.

Run as a script under torchrun (`torchrun --nproc_per_node 2 tests/test_llama_distributed.py RUNS.json`)
this file is also the worker of test_every_option_pair_trains_under_ddp_like_one_process: each rank
joins one process group and trains the runs of RUNS.json one after another, so one launch covers
them all."""

import itertools
import json
import os
import subprocess
import sys

import pytest

from test_distributed import _finish, _losses, _reference, _same, _settings, _torchrun, _val
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


# Every value of each option the trainer takes, and (pairwise coverage, checked below) every pair of
# values of two options, in 8 runs instead of the 384 of the full product.
OPTION_VALUES = {"positions": ("learned", "rotary"), "norm": ("layernorm", "rmsnorm"),
                 "mlp": ("gelu", "swiglu", "relu2"), "n_kv_head": (None, 1), "qk_norm": (False, True),
                 "bias": (False, True), "tie_word_embeddings": (True, False), "norm_gain": (True, False)}
COVERING = [  # positions, norm, mlp, n_kv_head, qk_norm, bias, tie_word_embeddings, norm_gain
    ("rotary", "layernorm", "gelu", None, True, True, False, False),
    ("learned", "rmsnorm", "gelu", 1, False, False, True, True),
    ("learned", "layernorm", "relu2", 1, True, True, True, True),
    ("learned", "rmsnorm", "swiglu", None, False, True, False, False),
    ("rotary", "rmsnorm", "relu2", None, True, False, True, False),
    ("rotary", "layernorm", "swiglu", 1, False, False, False, True),
    ("rotary", "rmsnorm", "swiglu", 1, True, True, True, False),
    ("rotary", "rmsnorm", "relu2", None, False, True, False, True),
]


def test_the_covering_set_has_every_pair_of_option_values():
    names = list(OPTION_VALUES)
    runs = [dict(zip(names, row)) for row in COVERING]
    for a, b in itertools.combinations(names, 2):
        for x, y in itertools.product(OPTION_VALUES[a], OPTION_VALUES[b]):
            assert any(r[a] == x and r[b] == y for r in runs), f"no run has {a}={x} with {b}={y}"


def test_every_option_pair_trains_under_ddp_like_one_process(work):
    """The runs of COVERING, one torchrun launch of 2 gloo ranks (DDP) training them in turn: each
    run's losses at every step and its val loss equal one process's run of the same config."""
    runs = {}
    for i, row in enumerate(COVERING):
        options = {k: v for k, v in zip(OPTION_VALUES, row) if v is not None}
        runs[f"cover{i}"] = _settings(work, f"cover{i}", max_iters=4, eval_interval=4, eval_iters=2,
                                      parallel="ddp", **options)
    (work / "cover_runs.json").write_text(json.dumps(runs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.abspath(__file__), str(work / "cover_runs.json")], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    out = _finish(proc, timeout=300)
    assert proc.returncode == 0 and out.count("worker: done") == 2, out[-3000:]
    for name, settings in runs.items():
        reference = _reference(work, settings, f"{name}_ref")
        _same(_losses(work / name), dict(enumerate(reference.losses, start=1)), range(1, 5))
        _same(_val(work / name), {4: reference.val_loss}, [4])


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


def _worker_main(runs_file: str) -> None:
    """Each rank: one gloo process group (train() reuses it and leaves it open), then every run."""
    import torch.distributed as dist

    from simplegpt.config import load_config
    from simplegpt.training.loop import train

    dist.init_process_group("gloo")
    try:
        for settings in json.loads(open(runs_file).read()).values():
            train(load_config(None, settings), progress=False, log=lambda s: None)
    finally:
        dist.destroy_process_group()
    print("worker: done", flush=True)


if __name__ == "__main__":
    _worker_main(sys.argv[1])
