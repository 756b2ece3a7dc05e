"""FSDP2 and sharded checkpoints (simplegpt.training.fsdp) in real processes: 2 ranks under torchrun on
gloo (tests/fsdp_worker.py) against one process accumulating the same global batch."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fsdp_worker as w
from simplegpt import checkpoint as ckpt
from simplegpt.errors import CheckpointError, OutputExistsError
from simplegpt.training import fsdp

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _equal_states(a: dict, b: dict) -> list[str]:
    """The keys where two nested states differ (tensors bit for bit, other values by ==)."""
    fa, fb = w.flatten(a), w.flatten(b)
    if fa.keys() != fb.keys():
        return sorted(fa.keys() ^ fb.keys())
    return [k for k in fa if not (torch.equal(fa[k], fb[k]) if isinstance(fa[k], torch.Tensor) else fa[k] == fb[k])]


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=0, abs_tol=TOL) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference (with a sharded checkpoint saved at step STEPS without a process
    group), then the 2-process worker. Skips, with the worker's reason, where FSDP2 cannot run."""
    tmp = tmp_path_factory.mktemp("fsdp")
    torch.set_num_threads(1)
    data = w.batches()
    model = w.make_model(0)
    optimizer = w.make_optimizer(model)
    losses = [w.train_step(model, optimizer, b) for b in data[:w.STEPS]]
    fsdp.save_sharded(tmp / "one", model, optimizer)
    one_saved = w.full_state(model, optimizer)
    losses += [w.train_step(model, optimizer, b) for b in data[w.STEPS:]]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "SIMPLEGPT_NATIVE": "0"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "fsdp_worker.py"), str(tmp), str(tmp / "one")],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp / "result.json").read_text())
    if "unavailable" in result:
        pytest.skip(f"FSDP2 cannot run on CPU/gloo here: {result['unavailable']}")
    return {"tmp": tmp, "one_losses": losses, "one_saved": one_saved, "result": result,
            "saved": torch.load(tmp / "full_at_save.pt", weights_only=False)}


def test_two_processes_train_as_one(runs):
    """FSDP2 over 2 ranks (each half the rows, gradient sync on the last micro-batch only, clipping
    on DTensors) gives the losses of 1 process accumulating the same global batch."""
    assert runs["result"]["world_size"] == 2
    assert runs["result"]["fully_sharded"] == ["", "transformer.h.0", "transformer.h.1"]  # each block, the root
    assert runs["result"]["tied"]
    assert _close(runs["result"]["losses"], runs["one_losses"]), (runs["result"]["losses"], runs["one_losses"])


def test_bf16_compute_keeps_float32_parameters(runs):
    """mp_policy=torch.bfloat16 computes in bf16 (the first loss moves off float32's, a little) while
    the sharded parameters, which the optimizer and checkpoints see, stay float32."""
    bf16, fp32 = runs["result"]["bf16_first_loss"], runs["result"]["losses"][0]
    assert 0 < abs(bf16 - fp32) < 0.05, (bf16, fp32)
    assert runs["result"]["bf16_param_dtypes"] == ["torch.float32"]


def test_resume_on_two_processes(runs):
    """A 2-process sharded checkpoint loads into 2 fresh ranks with the saved weights and optimizer
    state exactly, and the next steps' losses are the uninterrupted run's."""
    loaded = torch.load(runs["tmp"] / "full_resumed_2_from_2.pt", weights_only=False)
    assert _equal_states(loaded, runs["saved"]) == []
    assert _close(runs["result"]["resumed_2_from_2"], runs["result"]["losses"][w.STEPS:])


def test_resume_two_processes_from_one(runs):
    """A checkpoint saved by one process without a process group resumes on 2 ranks (DCP reshards)."""
    loaded = torch.load(runs["tmp"] / "full_resumed_2_from_1.pt", weights_only=False)
    assert _equal_states(loaded, runs["one_saved"]) == []
    assert _close(runs["result"]["resumed_2_from_1"], runs["one_losses"][w.STEPS:])


def test_resume_one_process_from_two(runs):
    """A 2-process checkpoint loads into a plain GPT in this process (no process group): the same
    weights (tied head still tied) and optimizer state, and the uninterrupted run's next losses."""
    model = w.make_model(7)
    optimizer = w.make_optimizer(model)
    fsdp.load_sharded(runs["tmp"] / "sharded", model, optimizer)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert _equal_states(w.full_state(model, optimizer), runs["saved"]) == []
    resumed = [w.train_step(model, optimizer, b) for b in w.batches()[w.STEPS:]]
    assert _close(resumed, runs["result"]["losses"][w.STEPS:])


def test_consolidate_gives_a_checkpoint_the_loader_reads(runs, tmp_path):
    src = runs["tmp"] / "sharded"
    assert fsdp.is_sharded_checkpoint(src) and not fsdp.is_sharded_checkpoint(runs["tmp"])
    with pytest.raises(CheckpointError, match=f"sharded .FSDP2. checkpoint; consolidate it first: simplegpt "
                                              f"consolidate {src}$"):
        ckpt.load_checkpoint(src)  # what generate, serve, eval and export-hf say of it
    dst = fsdp.consolidate(src, tmp_path / "plain")
    assert not fsdp.is_sharded_checkpoint(dst)
    loaded = ckpt.load_checkpoint(dst)
    assert loaded.metadata["step"] == w.STEPS and loaded.tokenizer.vocab_size == w.CONFIG["vocab_size"]
    assert _equal_states(loaded.model.state_dict(), runs["saved"]["model"]) == []
    with pytest.raises(OutputExistsError, match="--overwrite"):
        fsdp.consolidate(src, dst)
    assert not list(tmp_path.glob(".plain.*"))  # the temporary sibling was renamed in, nothing left


def test_consolidate_command(runs, tmp_path):
    """`simplegpt consolidate SRC` writes SRC-consolidated with a summary line; a directory that is
    not a sharded checkpoint is one line and exit 1."""
    src = tmp_path / "ck"
    src.symlink_to(runs["tmp"] / "sharded", target_is_directory=True)
    done = subprocess.run([sys.executable, "-m", "simplegpt", "consolidate", str(src)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    progress, summary = done.stdout.strip().splitlines()
    assert progress.startswith(f"consolidating {src}: 2 layers") and "2 shard files" in progress
    assert str(tmp_path / "ck-consolidated") in summary and "step 3" in summary
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "ck-consolidated").model.transformer.wpe.weight,
                       runs["saved"]["model"]["transformer.wpe.weight"])

    bad = subprocess.run([sys.executable, "-m", "simplegpt", "consolidate", str(tmp_path / "ck-consolidated")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a sharded (FSDP2) checkpoint" in lines[0] and "Traceback" not in bad.stderr


def test_load_into_another_shape_is_one_clear_error(runs):
    model = w.make_model(0)
    wide = type(model)(type(model.config)(**{**w.CONFIG, "n_embd": 64}))
    with pytest.raises(CheckpointError, match="cannot be loaded into this model: Size mismatch") as e:
        fsdp.load_sharded(runs["tmp"] / "sharded", wide, None)
    assert "\n" not in str(e.value) and "Frame" not in str(e.value)
    with pytest.raises(CheckpointError, match="not a sharded"):
        fsdp.load_sharded(runs["tmp"], model, None)
    fsdp.save_sharded(runs["tmp"] / "weights-only", model, None)
    with pytest.raises(CheckpointError, match="weights only, no optimizer state"):
        fsdp.load_sharded(runs["tmp"] / "weights-only", model, w.make_optimizer(model))
    fresh = w.make_model(5)
    fsdp.load_sharded(runs["tmp"] / "weights-only", fresh, None)
    assert _equal_states(fresh.state_dict(), model.state_dict()) == []


def test_a_corrupted_shard_is_one_clear_error(runs, tmp_path):
    """config.json's digests cover dcp/: a flipped byte in a rank's shard file is refused, naming it."""
    src = tmp_path / "ck"
    shutil.copytree(runs["tmp"] / "sharded", src)
    shard = src / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    model = w.make_model(0)
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp is truncated or corrupted"):
        fsdp.load_sharded(src, model, w.make_optimizer(model))
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp is truncated or corrupted"):
        fsdp.consolidate(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fsdp_needs_a_process_group():
    assert not torch.distributed.is_initialized()
    assert "torchrun" in fsdp.fsdp_unavailable(torch.device("cpu"))
