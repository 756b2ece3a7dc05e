"""Data parallelism over CPU cores in one process (simplegpt.training.core_shards) and the trainer's use of it."""

import json

import pytest
import torch

from conftest import make_tiny_gpt
from simplegpt import GPT
from simplegpt.checkpoint import load_checkpoint
from simplegpt.config import TrainConfig
from simplegpt.training.core_shards import CoreShards
from simplegpt.errors import ConfigError
from simplegpt.model import IGNORE_INDEX
from simplegpt.training.hardware import core_shards
from simplegpt.training.loop import train


def model(seed=0) -> GPT:
    return make_tiny_gpt(seed, vocab_size=40, n_positions=24)


def grads(m: GPT) -> list[torch.Tensor]:
    return [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("shards", [2, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_sharded_step_equals_the_whole_batch_step(shards, padded):
    torch.manual_seed(1)
    x, y = torch.randint(0, 40, (5, 20)), torch.randint(0, 40, (5, 20))
    mask = None
    if padded:  # rows with very different numbers of target tokens: the loss must weight by count
        mask = torch.ones(5, 20, dtype=torch.long)
        for row, pad in enumerate([0, 15, 3, 19, 8]):
            mask[row, :pad] = 0
            y[row, :pad] = IGNORE_INDEX
    whole = model()
    _, loss = whole(x, y, attention_mask=mask)
    (loss * 0.5).backward()
    ref_loss, ref_grads = loss.item(), grads(whole)

    sharded = model()
    cs = CoreShards(sharded, shards)
    saved = torch.get_num_threads()
    try:
        got = cs.forward_backward((x, y) if mask is None else (x, y, mask), scale=0.5)
    finally:
        cs.close()
        torch.set_num_threads(saved)
    assert abs(got - ref_loss) < 1e-5
    for g, r in zip(grads(sharded), ref_grads):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for replica in cs.replicas[1:] for p in replica.parameters())


def test_replicas_share_the_weights_and_see_optimizer_updates():
    m = model()
    cs = CoreShards(m, 2)
    try:
        opt = torch.optim.AdamW(m.parameters(), lr=0.1)
        x = torch.randint(0, 40, (4, 10))
        cs.forward_backward((x, x))
        opt.step()
        for p, q in zip(m.parameters(), cs.replicas[1].parameters()):
            assert p.data_ptr() == q.data_ptr() and torch.equal(p, q)
    finally:
        cs.close()


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": 8, **kw})


@pytest.mark.parametrize("kw,device,dtype,threads,want", [
    ({}, "cpu", torch.float32, 2, 2),
    ({}, "cpu", torch.float32, 1, 1),
    ({"batch_size": 3}, "cpu", torch.float32, 4, 3),
    ({"dropout": 0.1}, "cpu", torch.float32, 2, 1),
    ({"compile": True}, "cpu", torch.float32, 2, 1),
    ({}, "cpu", torch.bfloat16, 2, 1),
    ({}, "cuda", torch.float32, 2, 1),
    ({"cpu_shards": 1}, "cpu", torch.float32, 2, 1),
    ({"cpu_shards": 3}, "cpu", torch.float32, 2, 3),
])
def test_auto_and_explicit_shard_counts(kw, device, dtype, threads, want):
    assert core_shards(cfg(**kw), torch.device(device), dtype, threads) == want


@pytest.mark.parametrize("kw,match", [({"cpu_shards": 2, "dropout": 0.1}, "dropout"),
                                      ({"cpu_shards": 9}, "cannot exceed batch_size"),
                                      ({"cpu_shards": 2, "compile": True}, "compile")])
def test_impossible_shard_counts_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        core_shards(cfg(**kw), torch.device("cpu"), torch.float32, 2)


def test_sharded_training_resumes_bit_identically(tmp_path, shakespeare_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_path.read_text()[:60_000])
    base = dict(data=str(corpus), data_dir=str(tmp_path / "data"), n_layer=1, n_head=2, n_embd=16, block_size=16,
                batch_size=4, max_iters=9, eval_interval=4, eval_iters=2, log_interval=1, warmup_iters=2,
                sample_tokens=8, num_threads=2, cpu_shards=2, grad_accum_steps=2, plot=False, tensorboard=False,
                peak_flops=1e12)
    logs = []
    full = train(TrainConfig(**base, out_dir=str(tmp_path / "full")), progress=False, log=logs.append)
    assert any("each batch split 2 ways" in s for s in logs)
    part = TrainConfig(**base, out_dir=str(tmp_path / "part"))
    first = train(part, stop_at=5, progress=False, log=lambda s: None)
    resumed = train(part, resume=tmp_path / "part" / "last", progress=False, log=lambda s: None)
    assert first.losses + resumed.losses == full.losses
    assert full.losses[-1] < full.losses[0]
    a, b = load_checkpoint(tmp_path / "full" / "last").model, load_checkpoint(tmp_path / "part" / "last").model
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    records = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if r["kind"] == "train"] == full.losses
    assert torch.get_num_threads() == 2  # the trainer gives torch its threads back


def test_a_weight_given_new_storage_is_shared_again_at_the_next_step():
    m = model()
    cs = CoreShards(m, 2)
    try:
        x = torch.randint(0, 40, (4, 10))
        w = m.transformer.h[0].mlp.c_fc.weight
        w.data = w.data.t().contiguous().t() * 2  # e.g. a layout change, or a load with new tensors
        cs.forward_backward((x, x))
        assert cs.replicas[1].transformer.h[0].mlp.c_fc.weight.data_ptr() == w.data_ptr()
    finally:
        cs.close()
