"""One run over several processes with torchrun: real `torch.distributed.run` launches on gloo, a tiny
model on the CPU, one thread per rank. The ranks must compute what one process accumulating the same
global batch computes (every step's loss, the val loss), write the run folder once, resume across
world sizes, stop together on SIGTERM, and end (not hang) when a rank dies. See docs/distributed.md.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import simplegpt
from simplegpt.checkpoint import read_checkpoint_config
from simplegpt.config import load_config
from simplegpt.training.lock import lock_run_folder
from simplegpt.training.loop import train

from conftest import ONE_STEP, SPLITS, assert_same_steps, first_step, split, uneven_texts

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="finds torchrun's workers through /proc; gloo and signals as on Linux")

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with a small generated corpus (its prepared dataset is shared by the module's runs)."""
    root = tmp_path_factory.mktemp("dist")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog and runs far away to see what lies beyond".split()
    lines = (" ".join(rng.choice(words) for _ in range(12)) for _ in range(1500))
    (root / "corpus.txt").write_text("\n".join(lines))
    return root


def _settings(work: Path, out: str, **kw) -> dict:
    """A tiny run: a global batch of 4 micro-batches of 4, a checkpoint every 10 steps, no dropout; AdamW and
    its schedule (shakespeare_char's, the default's before the speedrun recipe, whose Muon gives way to AdamW
    under FSDP2 alone), so DDP, FSDP2 and their references agree."""
    settings = dict(optimizer="adamw", lr=2e-3, min_lr=2e-4, schedule="cosine", data=str(work / "corpus.txt"),
                    data_dir=str(work / "data"), n_layer=2, n_head=2, n_embd=32,
                    block_size=32, batch_size=4, grad_accum_steps=4, max_iters=20, warmup_iters=2,
                    eval_interval=10, eval_iters=5, log_interval=1, sample_tokens=0, dropout=0.0, num_threads=1,
                    peak_flops=1e12, plot=False, tensorboard=False, out_dir=str(work / out), dist_timeout=30)
    settings.update(kw)
    return settings


def _cli(settings: dict) -> list[str]:
    return [a for k, v in settings.items() for a in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


def _torchrun(work: Path, settings: dict, *train_args: str, nproc: int = 2, launcher: tuple = ("--standalone",),
              **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node", str(nproc),
           "-m", "simplegpt", "train", "--quiet", *_cli(settings), *train_args]
    return subprocess.Popen(cmd, cwd=work, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, **kw)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not end within {timeout} s:\n{out[-3000:]}")
    return out


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run) if r["kind"] == "train"}


def _val(run: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in _records(run) if r["kind"] == "eval"}


def _reference(work: Path, settings: dict, name: str, stop_at: int | None = None):
    """One process, the same config: the run the ranks must reproduce."""
    cfg = load_config(None, {**settings, "out_dir": str(work / name)})
    return train(cfg, stop_at=stop_at, progress=False)


def _same(got: dict[int, float], want: dict[int, float], steps) -> None:
    for s in steps:
        assert s in got, f"step {s} was not logged"
        assert abs(got[s] - want[s]) <= TOLERANCE, f"step {s}: {got[s]} (ranks) != {want[s]} (one process)"


def _wait_step(run: Path, proc: subprocess.Popen, step: int, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while not ((run / "metrics.jsonl").is_file() and any(r.get("step", 0) >= step for r in _safe_records(run))):
        assert proc.poll() is None, f"torchrun ended before step {step}:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.05)


def _safe_records(run: Path) -> list[dict]:
    try:
        return _records(run)
    except (OSError, ValueError):
        return []


def _worker(proc: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank."""
    deadline = time.time() + 30
    while time.time() < deadline:
        for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return int(child)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank}")


def test_sigterm_stops_every_rank_at_one_step_and_resumes_in_one_process(work):
    """2 ranks equal 1 process step by step; SIGTERM to torchrun: one checkpoint, workers exit 0, and
    that 2-process checkpoint resumed in 1 process gives the uninterrupted run's next losses."""
    settings = _settings(work, "term", max_iters=400, eval_interval=1000)
    run = work / "term"
    proc = _torchrun(work, settings)
    _wait_step(run, proc, 25)
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc, timeout=60)
    # torchrun itself exits 1 after a signal (it re-raises it); its workers stop cleanly: rank 0 says so
    # once and prints the run's summary (train() returned), and no rank reports an error
    assert out.count("stopped at step") == 1 and "steps: " in out, out[-3000:]
    assert "lost the other processes" not in out and "this is a bug" not in out, out[-3000:]
    stopped = int(read_checkpoint_config(run / "last")["step"])
    assert 25 <= stopped < 400
    steps = [r["step"] for r in _records(run) if r["kind"] == "train"]
    assert steps == list(range(1, stopped + 1)), "every step's record once, from one writer"

    reference = _reference(work, settings, "term_ref", stop_at=stopped + 5)
    want = dict(enumerate(reference.losses, start=1))
    _same(_losses(run), want, range(1, stopped + 1))
    resumed = train(load_config(None, settings), resume=run / "last", stop_at=stopped + 5, progress=False)
    assert resumed.step == stopped + 5
    _same(_losses(run), want, range(stopped + 1, stopped + 6))


def test_resume_one_process_checkpoint_on_two_simulated_nodes(work):
    """A 1-process checkpoint at step 10, resumed by two torchrun launchers (--nnodes 2, c10d rendezvous
    on 127.0.0.1): steps 11-20 and the val loss at step 20 equal the uninterrupted run's."""
    settings = _settings(work, "nodes")
    reference = _reference(work, settings, "nodes_ref")
    first = train(load_config(None, settings), stop_at=10, progress=False)
    assert first.step == 10
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [_torchrun(work, settings, "--resume", str(work / "nodes" / "last"), nproc=1,
                       launcher=("--nnodes", "2", "--node_rank", str(i), "--rdzv_backend", "c10d",
                                 "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "nodes",
                                 "--rdzv_conf", f"is_host={int(i == 0)}"))
             for i in range(2)]
    outs = [_finish(p) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs
    assert "2 processes (DDP over gloo" in "".join(outs)
    run = work / "nodes"
    _same(_losses(run), dict(enumerate(reference.losses, start=1)), range(1, 21))
    _same(_val(run), {20: reference.val_loss}, [20])
    assert [r["step"] for r in _records(run) if r["kind"] == "train"] == list(range(1, 21))


def test_restarted_workers_resume_and_finish_the_run(work):
    """--max-restarts 1 --resume auto: rank 1 killed after the first checkpoint; the restarted ranks
    go on from it and the run ends with every step once, each equal to one process's."""
    settings = _settings(work, "restart", max_iters=40, n_embd=64, block_size=64, batch_size=8)
    run = work / "restart"
    proc = _torchrun(work, settings, "--resume", "auto", launcher=("--standalone", "--max-restarts", "1"))
    _wait_step(run, proc, 14)
    os.kill(_worker(proc, 1), signal.SIGKILL)
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming" in out and "at step" in out, out[-3000:]
    assert "this is a bug" not in out, out[-3000:]
    reference = _reference(work, settings, "restart_ref")
    assert [r["step"] for r in _records(run) if r["kind"] == "train"] == list(range(1, 41))
    _same(_losses(run), dict(enumerate(reference.losses, start=1)), range(1, 41))
    _same(_val(run), {40: reference.val_loss}, [40])


def test_a_dead_rank_ends_the_run_within_the_timeout(work):
    settings = _settings(work, "dead", max_iters=10**6, eval_interval=10**6)
    proc = _torchrun(work, settings)
    _wait_step(work / "dead", proc, 5)
    os.kill(_worker(proc, 1), signal.SIGKILL)
    t0 = time.time()
    out = _finish(proc, timeout=settings["dist_timeout"] + 30)
    assert time.time() - t0 < settings["dist_timeout"]
    assert proc.returncode != 0
    assert "rank 0: lost the other processes of the run" in out, out[-3000:]
    assert "this is a bug" not in out, out[-3000:]


def test_accumulation_not_divisible_by_the_world_size_is_one_line(work):
    settings = _settings(work, "bad", grad_accum_steps=3)
    proc = _torchrun(work, settings)
    out = _finish(proc, timeout=60)
    assert proc.returncode != 0
    lines = [ln for ln in out.splitlines() if "grad_accum_steps 3 must be divisible by the world size 2" in ln]
    assert len(lines) == 1, out[-3000:]  # said once, by rank 0
    # torchrun prints its own traceback (ChildFailedError) for failed workers; the workers print none (no frame
    # in the package: torchrun's own frames may sit under a checkout whose folder is also named simplegpt)
    package = str(Path(simplegpt.__file__).parent)
    assert not [ln for ln in out.splitlines() if ln.strip().startswith("File ") and package in ln], out[-3000:]
    assert not (work / "bad").exists(), "nothing is written for a run that cannot start"


@pytest.mark.parametrize("bad, message", [
    (("--dist_timeout", "0"), "dist_timeout must be a positive integer, got 0"),  # a setting's check
    (("--max_itres", "5"), "unrecognized arguments: --max_itres"),  # the command line's parser
    (("--resume", "no_such_run"), "checkpoint no_such_run does not exist"),  # before the trainer starts
])
def test_an_error_before_training_is_said_once_not_by_every_rank(work, bad, message):
    proc = _torchrun(work, _settings(work, "bad_early"), *bad)
    out = _finish(proc, timeout=60)
    assert proc.returncode != 0
    assert len([ln for ln in out.splitlines() if message in ln]) == 1, out[-3000:]  # rank 0's line only


def test_a_run_folder_in_use_stops_every_rank_with_rank_0s_line(work):
    """Rank 0 alone takes the run folder's lock: when another trainer holds it, rank 0 says so once and
    the other ranks leave with it instead of waiting for rank 0 in a collective."""
    settings = _settings(work, "busy")
    with lock_run_folder(work / "busy"):
        t0 = time.time()
        proc = _torchrun(work, settings)
        out = _finish(proc, timeout=60)
    assert proc.returncode != 0
    assert len([ln for ln in out.splitlines() if "is in use by another simplegpt train process" in ln]) == 1, out
    assert "could not start" not in out  # the other rank is quiet: rank 0's line is the one
    assert time.time() - t0 < settings["dist_timeout"]


def test_fsdp_shards_train_like_one_process_and_resume_on_other_world_sizes(work):
    """parallel = 'fsdp' (FSDP2 on gloo): 2 ranks to step 7, resumed by 1 to step 14, then by 2 to step 20;
    every step's loss and the val losses equal one process's (PyTorch's AdamW on both sides: fused false)."""
    settings = _settings(work, "fsdp", grad_accum_steps=2, eval_interval=7, fused=False, parallel="fsdp")
    reference = _reference(work, {**settings, "parallel": "ddp"}, "fsdp_ref")
    run = work / "fsdp"
    for nproc, stop, resume in ((2, 7, ()), (1, 14, ("--resume", str(run / "last"))), (2, None, ("--resume", "auto"))):
        proc = _torchrun(work, settings, *resume, *(("--stop-at", str(stop)) if stop else ()), nproc=nproc)
        out = _finish(proc)
        assert proc.returncode == 0, out[-3000:]
        assert f"{nproc} process{'es' if nproc > 1 else ''} (FSDP2 over gloo" in out
        assert len(list((run / "last" / "dcp").glob("*.distcp"))) == nproc  # each rank wrote its shard
        # the hints name commands that read a sharded checkpoint (plain 'simplegpt train/generate' refuse it)
        if stop:
            assert f"continue with: torchrun --nproc_per_node {nproc} -m simplegpt train --resume" in out, out[-2000:]
        else:
            assert f"next: simplegpt consolidate {run / 'best'}" in out, out[-2000:]
            assert "simplegpt generate --checkpoint " + str(run / "best") + " " not in out, out[-2000:]
    _same(_losses(run), dict(enumerate(reference.losses, start=1)), range(1, 21))
    _same(_val(run), {7: _val(work / "fsdp_ref")[7], 14: _val(work / "fsdp_ref")[14], 20: reference.val_loss},
          [7, 14, 20])
    assert [r["step"] for r in _records(run) if r["kind"] == "train"] == list(range(1, 21))


# Trains each config (JSON) in turn under one torchrun launch, in the process group it makes once
# (train() reuses a group its caller made): one launch's start-up instead of one per config.
TRAIN_EACH = """
import json, sys
import torch.distributed as dist
from simplegpt.config import load_config
from simplegpt.training.loop import train
dist.init_process_group("gloo")
for settings in sys.argv[1:]:
    train(load_config(None, json.loads(settings)), progress=False)
dist.destroy_process_group()
"""


def test_accumulation_weighs_padded_micro_batches_by_their_tokens_over_ranks(work):
    """The same 8 padded rows of 3 to 80 tokens as 4x2 and 1x8 on 2 DDP ranks and 2x4 on 2 FSDP2 ranks:
    the first step's loss, gradient norm, val loss and (DDP) gradients equal one process's 8x1, within 1e-6 (each
    micro-batch weighs by its share of the whole step's tokens, over both ranks)."""
    texts = uneven_texts(work / "uneven.jsonl")
    settings = dict(_settings(work, "uneven"), data=str(texts), data_dir=str(work / "uneven_data"), fused=False,
                    **ONE_STEP)
    _reference(work, {**settings, **split(*SPLITS[0])}, "uneven_8x1")
    runs = {f"uneven_{b}x{a}_{parallel}": {**settings, **split(b, a), "parallel": parallel}
            for (b, a), parallel in zip(SPLITS[1:], ("ddp", "fsdp", "ddp"))}
    script = work / "train_each.py"
    script.write_text(TRAIN_EACH)
    configs = [json.dumps({**kw, "out_dir": str(work / name)}) for name, kw in runs.items()]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *configs], cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    steps = [first_step(work / "uneven_8x1")] + [first_step(work / name) for name in runs if name.endswith("ddp")]
    assert_same_steps(steps)
    # a sharded checkpoint keeps its optimizer state in dcp/, each rank's part: its losses and gradient norm
    [fsdp] = [name for name in runs if name.endswith("fsdp")]
    [step] = [r for r in _records(work / fsdp) if r["kind"] == "train"]
    loss, norm, val, _ = steps[0]
    assert abs(step["loss"] - loss) < 1e-6 and abs(step["grad_norm"] - norm) < 1e-6
    assert abs(_val(work / fsdp)[1] - val) < 1e-6
