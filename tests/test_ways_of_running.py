"""The ways of running a training run (simplegpt.training.ways: one process, CPU core shards, DDP,
FSDP2) pass one contract through their one interface (tests/ways_worker.py): the losses of one process,
a stop on a signal (to one rank) after the step it arrived in, on every rank, with a checkpoint that
resumes to the uninterrupted run's losses bit for bit. DDP and FSDP2 run as real torchrun launches on
gloo, 2 ranks. Also the pluggable parts: Muon (its recipe's parameter groups, training, exact resume,
refused under FSDP2) and the loss (masks, micro-batches without loss tokens)."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ways_worker as w
from simplegpt.config import TrainConfig
from simplegpt.model import IGNORE_INDEX
from simplegpt.training import ways
from simplegpt.training.core_shards import CoreShards
from simplegpt.training.evaluation import eval_sum
from simplegpt.training.loss import CrossEntropy, weights
from simplegpt.training.muon import MuonAdamW, muon_groups
from simplegpt.training.optimizer import OPTIMIZERS, make_optimizer

from conftest import make_tiny_gpt

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # the ranks' float sums in another order than one process's (as tests/test_distributed.py)
MAX_ITERS = 8


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ways")
    words = "to be or not to be that is the question whether tis nobler in the mind to suffer".split()
    (root / "corpus.txt").write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(10))
                                               for i in range(400)))
    return root


def _settings(work: Path, **kw) -> dict:
    """A tiny run: a step of 2 micro-batches of 4 rows, an evaluation (and checkpoint) every 4 steps. The ranks
    wait up to 300 s for each other: a first checkpoint on a busy machine (DCP's first use) can take over a
    minute on rank 0, and a rank that gave up would leave the other waiting in the next collective."""
    # lr and schedule: the AdamW config's (shakespeare_char), the default's before the speedrun recipe
    return dict(data=str(work / "corpus.txt"), data_dir=str(work / "data"), n_layer=2, n_head=2, n_embd=32,
                lr=2e-3, min_lr=2e-4, schedule="cosine",
                block_size=32, batch_size=4, grad_accum_steps=2, max_iters=MAX_ITERS, warmup_iters=2,
                eval_interval=4, eval_iters=2, dropout=0.0, num_threads=1, fused=False, peak_flops=1e12,
                dist_timeout=300, **kw)


def _steps(seen: dict, key: str) -> dict[int, float]:
    return {int(k): v for k, v in seen[key].items()}


@pytest.fixture(scope="module")
def one_process(work) -> dict:
    """The contract's runs in one process, plain (cpu_shards 1): the reference every way must reproduce."""
    torch.set_num_threads(1)
    return {opt: w.contract(_settings(work, cpu_shards=1, optimizer=opt), work, f"single_{opt}")
            for opt in ("adamw", "muon")}


def _torchrun(work: Path, specs: list[dict]) -> dict[str, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "ways_worker.py"), str(work), *map(json.dumps, specs)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return {spec["name"]: json.loads((work / f"{spec['name']}.json").read_text()) for spec in specs}


@pytest.fixture(scope="module")
def launched(work, one_process) -> dict[str, dict]:
    """DDP (AdamW and Muon) and FSDP2 (AdamW; Muon must be refused), one torchrun launch each way."""
    seen = _torchrun(work, [{"name": f"ddp_{opt}", "settings": _settings(work, parallel="ddp", optimizer=opt)}
                            for opt in ("adamw", "muon")])
    seen |= _torchrun(work, [{"name": f"fsdp_{opt}", "settings": _settings(work, parallel="fsdp", optimizer=opt)}
                             for opt in ("adamw", "muon")])
    return seen


def _contract(seen: dict, reference: dict, exact: bool) -> None:
    """The contract, for what one way saw against one process's runs."""
    want = _steps(reference, "whole")
    got = _steps(seen, "whole")
    assert sorted(got) == list(range(1, MAX_ITERS + 1))
    for step in want:
        if exact:
            assert got[step] == want[step], f"step {step}"
        else:
            assert abs(got[step] - want[step]) <= TOLERANCE, f"step {step}: {got[step]} != {want[step]}"
    for step, val in _steps(reference, "whole_val").items():
        assert abs(_steps(seen, "whole_val")[step] - val) <= (0 if exact else TOLERANCE)
    # the signal reached one process during step SIGNAL_STEP: the run stopped after it, with its checkpoint
    assert seen["interrupted"] == "SIGTERM" and seen["stopped_step"] == w.SIGNAL_STEP
    # resumed from that checkpoint: each later step's loss and the val losses are the uninterrupted run's, bit for bit
    assert seen["resumed_step"] == MAX_ITERS
    assert _steps(seen, "after_resume") == got
    assert _steps(seen, "after_resume_val") == _steps(seen, "whole_val")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_one_process(one_process, optimizer):
    _contract(one_process[optimizer], one_process[optimizer], exact=True)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_core_shards(work, one_process, optimizer):
    torch.set_num_threads(1)
    seen = w.contract(_settings(work, cpu_shards=2, optimizer=optimizer), work, f"shards_{optimizer}")
    _contract(seen, one_process[optimizer], exact=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun on gloo, as tests/test_distributed.py")
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp(launched, one_process, optimizer):
    _contract(launched[f"ddp_{optimizer}"], one_process[optimizer], exact=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun on gloo, as tests/test_distributed.py")
def test_fsdp2(launched, one_process):
    _contract(launched["fsdp_adamw"], one_process["adamw"], exact=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun on gloo, as tests/test_distributed.py")
def test_fsdp2_refuses_muon_in_one_line(launched):
    refused = launched["fsdp_muon"]["refused"]
    assert refused.startswith("ConfigError: optimizer = 'muon' cannot run with parallel = 'fsdp'")
    assert "\n" not in refused and "parallel = 'ddp'" in refused


def test_the_ways_follow_the_settings():
    cpu = torch.device("cpu")
    assert type(ways.select(TrainConfig(cpu_shards=1, num_threads=2), cpu)) is ways.Single
    chosen = ways.select(TrainConfig(cpu_shards=2, num_threads=2, dropout=0.0), cpu)
    assert isinstance(chosen, ways.CoreShardsWay) and chosen.shards_count == 2
    assert set(ways.LAUNCHED) == set(TrainConfig.__dataclass_fields__["parallel"].metadata["choices"])


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    """Keller Jordan's recipe: Muon for the hidden 2-D weights, AdamW for embeddings (the tied head),
    LayerNorm gains and biases."""
    model = make_tiny_gpt()
    opt = MuonAdamW(model, TrainConfig(optimizer="muon", weight_decay=0.1), torch.device("cpu"),
                    torch.amp.GradScaler("cpu", enabled=False))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    assert muon == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    adamw = {names[id(p)]: g["weight_decay"] for g in opt.adamw.param_groups for p in g["params"]}
    assert set(adamw) | muon == set(names.values()) and not set(adamw) & muon
    assert adamw["transformer.wte.weight"] == adamw["transformer.wpe.weight"] == 0.0  # the embeddings, head tied
    assert all(adamw[n] == 0.0 for n in adamw if n.endswith(".bias") or ".ln_" in n)
    assert [g["weight_decay"] for g in opt.muon.param_groups] == [0.1]
    assert isinstance(opt.muon, torch.optim.Muon) and isinstance(opt.adamw, torch.optim.AdamW)
    assert set(OPTIMIZERS) == set(TrainConfig.__dataclass_fields__["optimizer"].metadata["choices"])
    # decay_embeddings moves them to the decayed group, never to Muon
    hidden, rest = muon_groups(model, 0.1, decay_embeddings=True)
    assert model.transformer.wte.weight in rest[0]["params"] and len(hidden[0]["params"]) == 8


def test_muon_trains_and_its_state_round_trips():
    """Loss falls over a few steps of a fixed batch; state_dict has torch's shape and loads back into a
    fresh optimizer, which then steps exactly as the first."""
    torch.manual_seed(0)
    x = torch.randint(0, 50, (4, 16))
    y = torch.roll(x, -1, 1)

    def step(model, opt):
        loss = model.loss(x, y)
        loss.backward()
        opt.clip_and_step(1.0)
        opt.zero_grad()
        return float(loss.detach())

    cfg = TrainConfig(optimizer="muon", lr=3e-3, fused=False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model = make_tiny_gpt()
    opt = make_optimizer(model, cfg, torch.device("cpu"), scaler)
    losses = [step(model, opt) for _ in range(15)]
    assert losses[-1] < losses[0] - 0.5, losses
    state = opt.state_dict()
    assert set(state) == {"state", "param_groups"} and all(isinstance(g["params"], list) for g in state["param_groups"])
    twin = make_tiny_gpt()
    twin.load_state_dict(model.state_dict())
    other = make_optimizer(twin, cfg, torch.device("cpu"), scaler)
    other.load_state_dict(copy.deepcopy(state))  # as from a file: no tensor shared with the first
    assert step(model, opt) == step(twin, other)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    adamw = make_optimizer(make_tiny_gpt(), cfg.replace(optimizer="adamw"), torch.device("cpu"), scaler)
    with pytest.raises(ValueError, match="another optimizer"):
        other.load_state_dict(adamw.state_dict())


@pytest.mark.parametrize("groups", [1, 2])
def test_muon_split_over_two_threads_steps_exactly_as_one_optimizer(groups, monkeypatch):
    """clip_and_step(beside=...) runs Muon for half of the matrices on another thread: the weights, the
    norms and the state are torch.optim.Muon's over all of them bit for bit, as the learning rate changes
    (each group's own), and the state_dicts load into each other (an old checkpoint resumes into the
    split step and back)."""
    from concurrent.futures import ThreadPoolExecutor

    import simplegpt.training.muon as muon

    if groups == 2:  # Muon's matrices in two groups of their own settings
        recipe = muon.muon_groups

        def two_groups(*args):
            hidden, adamw = recipe(*args)
            params = hidden[0]["params"]
            return [{"params": params[:3], "weight_decay": 0.1},
                    {"params": params[3:], "weight_decay": 0.0, "momentum": 0.9}], adamw

        monkeypatch.setattr(muon, "muon_groups", two_groups)

    cfg = TrainConfig(optimizer="muon", lr=3e-3, fused=False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model, twin = make_tiny_gpt(), make_tiny_gpt()
    twin.load_state_dict(model.state_dict())
    one, split = (make_optimizer(m, cfg, torch.device("cpu"), scaler) for m in (model, twin))
    pool, ran = ThreadPoolExecutor(1), []

    def beside(fn):
        ran.append(fn)
        return pool.submit(fn)

    x = torch.randint(0, 50, (4, 16))
    y = torch.roll(x, -1, 1)

    def step(m, opt, i, **kw):
        for j, group in enumerate(opt.param_groups):
            group["lr"] = 3e-3 * (1 - i / 10) * (1 + j)
        m.loss(x, y).backward()
        norm = opt.clip_and_step(1.0, **kw)
        opt.zero_grad()
        return norm

    try:
        for i in range(4):
            assert step(model, one, i) == step(twin, split, i, beside=beside)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
        assert len(ran) == 4 and split._halves is not None
        halves = [{id(p) for g in h.param_groups for p in g["params"]} for h in split._halves]
        matrices = {id(p) for g in split.muon.param_groups for p in g["params"]}
        assert not halves[0] & halves[1] and halves[0] | halves[1] == matrices and len(matrices) == 8
        assert len(halves[0]) == len(halves[1]) == 4  # 2 blocks x 4 matrices: each half 1 of each shape
        assert str(one.state_dict()) == str(split.state_dict())
        # resume: the plain optimizer's state into the split one, and on; then the split's into a plain one
        again = make_optimizer(twin, cfg, torch.device("cpu"), scaler)
        again.load_state_dict(copy.deepcopy(one.state_dict()))
        for i in range(4, 6):
            assert step(model, one, i) == step(twin, again, i, beside=beside)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
        plain = make_optimizer(model, cfg, torch.device("cpu"), scaler)
        plain.load_state_dict(copy.deepcopy(again.state_dict()))
        assert step(model, plain, 6) == step(twin, again, 6, beside=beside)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
        # a state loaded into an optimizer that has split steps already: its halves follow it
        again.load_state_dict(copy.deepcopy(plain.state_dict()))
        assert step(model, plain, 7) == step(twin, again, 7, beside=beside)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
        assert str(plain.state_dict()) == str(again.state_dict())
    finally:
        pool.shutdown()


def test_core_shards_steps_muon_on_both_cores_with_the_same_losses(work, monkeypatch):
    """The core-shards way splits Muon's step over its threads; the run's losses are those of the same way
    stepping Muon on one thread, bit for bit."""
    torch.set_num_threads(1)
    base = {**_settings(work, cpu_shards=2, optimizer="muon"), "max_iters": 4, "log_interval": 1, "plot": False,
            "tensorboard": False, "sample_tokens": 0}
    beside, calls = CoreShards.beside, []
    with monkeypatch.context() as patch:
        patch.setattr(CoreShards, "beside", lambda self, fn: calls.append("split") or beside(self, fn))
        split = w.loop.train(w.load_config(None, {**base, "out_dir": str(work / "muon_split")}), progress=False)
    monkeypatch.setattr(ways.CoreShardsWay, "clip_and_step",
                        lambda self, opt, max_norm: calls.append("plain") or opt.clip_and_step(max_norm))
    plain = w.loop.train(w.load_config(None, {**base, "out_dir": str(work / "muon_plain")}), progress=False)
    assert calls == ["split"] * 4 + ["plain"] * 4 and len(split.losses) == 4
    assert split.losses == plain.losses
    assert split.val_loss == plain.val_loss


def test_a_micro_batch_without_loss_tokens_adds_zero_not_nan():
    model = make_tiny_gpt()
    loss = CrossEntropy()
    x = torch.randint(0, 50, (2, 8))
    y = torch.full_like(x, IGNORE_INDEX)
    assert loss.tokens((x, y)) == 0 and weights([0, 6, 2]) == [0.0, 0.75, 0.25] and weights([0, 0]) == [0.0, 0.0]
    assert torch.isnan(model.loss(x, y))  # what the guard is for
    value = loss(model, x, y, None, empty=True)
    value.backward()
    assert float(value.detach()) == 0.0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and not p.grad.any() for p in model.parameters())
    # evaluation skips such a batch instead of adding NaN x 0
    batches = iter([(x, y), (x, torch.roll(x, -1, 1))])
    sampler = type("S", (), {"next_batch": lambda self: next(batches)})
    compute = ways.Compute(torch.device("cpu"), torch.float32, torch.autocast("cpu", enabled=False),
                           torch.amp.GradScaler("cpu", enabled=False), loss)
    total, tokens = eval_sum(model, sampler, 2, compute)
    with torch.no_grad():
        want = float(model.loss(x, torch.roll(x, -1, 1)))
    assert tokens == 16 and total == pytest.approx(want * 16)


def test_a_loss_mask_leaves_the_masked_targets_out():
    loss = CrossEntropy()
    x = torch.randint(0, 50, (2, 6))
    y = torch.roll(x, -1, 1)
    mask = torch.ones_like(x)
    keep = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    prepared = loss.prepare((x, y, mask, keep))
    assert len(prepared) == 3 and loss.tokens(prepared) == 8
    assert torch.equal(prepared[1], torch.where(keep == 1, y, IGNORE_INDEX))
    assert loss.prepare((x, y)) == (x, y)


@pytest.mark.parametrize("way", [ways.Single(1, torch.device("cpu")), ways.CoreShardsWay(1, torch.device("cpu"), 2)],
                         ids=["single", "core_shards"])
def test_a_step_with_a_micro_batch_without_loss_tokens_stays_finite(way):
    """Through the interface: a step of an empty micro-batch and a full one has the full one's loss and
    gradients (the empty one weighs 0 and adds no NaN)."""
    model, twin = make_tiny_gpt(), make_tiny_gpt()
    x = torch.randint(0, 50, (2, 8))
    y = torch.roll(x, -1, 1)
    loss = CrossEntropy()
    batches = [(x, torch.full_like(y, IGNORE_INDEX)), (x, y)]
    compute = ways.Compute(torch.device("cpu"), torch.float32, torch.autocast("cpu", enabled=False),
                           torch.amp.GradScaler("cpu", enabled=False), loss)
    way.wrap(model, TrainConfig(), compute)
    try:
        got = way.forward_backward(batches, weights([loss.tokens(b) for b in batches]))
    finally:
        way.close()
    want = twin.loss(x, y)
    want.backward()
    assert got == pytest.approx(float(want), abs=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)
