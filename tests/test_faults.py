"""Process and file-system faults around a training run, with real processes, signals and disks:
Ctrl-C under `| tee` and a reader that leaves, two trainers in one run folder, a full disk.
See docs/reliability.md for the promises these tests stand behind.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simplegpt.checkpoint import load_train_state, read_checkpoint_config
from simplegpt.training.lock import RunFolderInUse, lock_run_folder
from simplegpt.training.run_dir import METRICS_FILE, Metrics


@pytest.fixture
def corpus(tmp_path, shakespeare_path):
    path = tmp_path / "corpus.txt"
    path.write_text(shakespeare_path.read_text()[:60_000])
    return path


def _args(tmp_path, corpus, out, **kw):
    """A tiny, endless run (stopped by the test) that logs every step and saves every 5; AdamW, whose
    checkpoint sizes the disk-space tests count (the default recipe's Muon keeps one moment, not two)."""
    settings = dict(optimizer="adamw", data=corpus, data_dir=tmp_path / "data", n_layer=1, n_head=2, n_embd=16, block_size=16,
                    batch_size=4, eval_iters=2, sample_tokens=8, peak_flops=1e12, num_threads=1, plot="false",
                    log_interval=1, eval_interval=5, max_iters=10**7, out_dir=out)
    settings.update(kw)
    return [a for k, v in settings.items() for a in (f"--{k}", str(v))]


def _start(args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simplegpt", "train", *args], text=True, **kw)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the trainer ended (exit {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_steps(run: Path) -> list[int]:
    return [r["step"] for r in _records(run) if r["kind"] == "train"]


def _steps_logged(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return metrics.read_text().count('"kind": "train"') if metrics.is_file() else 0


def _logged(run: Path, n: int):
    return lambda: _steps_logged(run) >= n


def _stopped_cleanly(run: Path, steps_before: int) -> int:
    """The run saved last/ when it stopped, and its metrics are one record per step up to it."""
    step = load_train_state(run / "last")["step"]
    assert step >= steps_before
    assert _train_steps(run) == list(range(1, step + 1))
    return step


# --- a closed or broken stdout/stderr -------------------------------------------------------------


@pytest.mark.parametrize("stderr", ["into the pipe", "apart"])
def test_ctrl_c_under_tee_saves_and_exits_130(tmp_path, corpus, stderr):
    """`simplegpt train ... [2>&1] | tee log`, then Ctrl-C: the terminal sends SIGINT to the whole
    foreground process group, so tee dies as the trainer starts to save and say where."""
    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    read_end, write_end = os.pipe()
    with open(err, "w") as err_file:
        trainer = _start(_args(tmp_path, corpus, run), stdout=write_end,
                         stderr=write_end if stderr == "into the pipe" else err_file, process_group=0)
    tee = subprocess.Popen(["tee", str(tmp_path / "log")], stdin=read_end, stdout=subprocess.DEVNULL,
                           process_group=trainer.pid)
    os.close(read_end)
    os.close(write_end)
    try:
        _wait_for(_logged(run, 8), trainer, "8 logged steps")
        os.killpg(trainer.pid, signal.SIGINT)  # the trainer and tee, as the terminal does
        assert tee.wait(timeout=30) == -signal.SIGINT
        assert trainer.wait(timeout=90) == 128 + signal.SIGINT
    finally:
        for p in (trainer, tee):
            p.kill() if p.poll() is None else None
    _stopped_cleanly(run, 8)
    assert "Traceback" not in err.read_text() and "Error" not in err.read_text(), err.read_text()


def test_a_reader_that_leaves_does_not_stop_the_run(tmp_path, corpus):
    """The reader of the output dies alone (`| head`, a killed tee): training goes on without output,
    and a later SIGTERM still saves and exits 143."""
    run = tmp_path / "run"
    trainer = _start(_args(tmp_path, corpus, run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(_logged(run, 5), trainer, "5 logged steps")
        trainer.stdout.close()  # the pipe's only reader is gone: every write from now on is EPIPE
        logged = _steps_logged(run)
        _wait_for(_logged(run, logged + 200), trainer, "200 more steps after the reader left")
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(timeout=90) == 128 + signal.SIGTERM
    finally:
        trainer.kill() if trainer.poll() is None else None
    _stopped_cleanly(run, logged + 200)


# --- one trainer per run folder ---------------------------------------------------------------------


@pytest.mark.parametrize("second", ["the same command", "another seed with --overwrite", "--resume"])
def test_a_second_trainer_in_a_running_run_folder_is_refused_naming_the_first(tmp_path, corpus, second):
    run = tmp_path / "run"
    first = _start(_args(tmp_path, corpus, run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: (run / "last" / "config.json").is_file(), first, "the first checkpoint")
        extra = {"the same command": _args(tmp_path, corpus, run),
                 "another seed with --overwrite": [*_args(tmp_path, corpus, run, seed=7), "--overwrite"],
                 "--resume": ["--resume", str(run)]}[second]
        proc = subprocess.run([sys.executable, "-m", "simplegpt", "train", *extra, "--quiet"], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith("simplegpt train: error: run folder") and "is in use" in line, line
        assert f"pid {first.pid} on host " in line
        assert first.poll() is None  # the first run goes on, untouched
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=90) == 128 + signal.SIGTERM, first.stderr.read()
    finally:
        first.kill() if first.poll() is None else None
    step = _stopped_cleanly(run, 5)  # one run's records only, not two interleaved
    saved = read_checkpoint_config(run / "last")
    assert saved["train_config"]["seed"] == 1337 and f"seed = {1337}" in (run / "config.toml").read_text()
    assert saved["step"] == step


def test_the_lock_of_a_killed_trainer_is_taken_over(tmp_path, corpus):
    run = tmp_path / "run"
    first = _start(_args(tmp_path, corpus, run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (run / "last" / "config.json").is_file(), first, "the first checkpoint")
    finally:
        first.kill()  # SIGKILL: no cleanup at all, the lock file stays with its pid
    first.wait(timeout=30)
    assert json.loads((run / ".lock").read_text())["pid"] == first.pid
    step = read_checkpoint_config(run / "last")["step"]
    proc = subprocess.run([sys.executable, "-m", "simplegpt", "train", "--resume", str(run), "--max_iters",
                           str(step + 3), "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert load_train_state(run / "last")["step"] == step + 3


def test_the_lock_is_exclusive_within_one_process_and_released_after(tmp_path):
    lock = lock_run_folder(tmp_path / "run")
    with pytest.raises(RunFolderInUse, match=f"pid {os.getpid()} on host"):
        lock_run_folder(tmp_path / "run")
    lock.release()
    lock_run_folder(tmp_path / "run").release()


# --- a full disk ------------------------------------------------------------------------------------


def _fill(disk: Path, leave: int = 0) -> Path:
    """Fill the disk up to `leave` free bytes, with one file."""
    filler = disk / "filler"
    with open(filler, "ab", buffering=0) as f:
        while (free := shutil.disk_usage(disk).free - leave) > 0:
            try:
                f.write(b"\0" * min(free, 1 << 20))
            except OSError:
                break
    return filler


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*") if p.name != ".lock"]


@pytest.mark.parametrize("leave_kib", [0, 8, 24])
def test_a_full_disk_mid_run_is_one_line_naming_the_last_good_checkpoint(tmp_path, corpus, small_disk, leave_kib):
    """The disk fills up while the run goes on; the write that fails is samples.txt or metrics.jsonl
    (0 KiB left), or a checkpoint's train state or weights (with metrics written only at evaluations)."""
    disk = small_disk("20m")
    run = disk / "run"
    log_interval = 1 if leave_kib == 0 else 10**7
    proc = _start(_args(tmp_path, corpus, run, n_embd=32, log_interval=log_interval), stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: (run / "last" / "config.json").is_file(), proc, "the first checkpoint")
        filler = _fill(disk, leave_kib << 10)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 1, err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "Error" not in err, err
    saved = read_checkpoint_config(run / "last")["step"]
    assert line.startswith(f"simplegpt train: error: the disk of {run} is full ({run}/"), line  # the file named
    assert "No space left on device" in line
    assert f"{run / 'last'} (step {saved}) is the last good checkpoint" in line
    assert f"simplegpt train --resume {run / 'last'}" in line
    records = _records(run)  # every line a whole record: the failed one was cut back off
    assert [r["step"] for r in records if r["kind"] == "eval"][-1] >= saved
    assert _leftovers(run) == []  # no half-written checkpoint copy, write test or picture
    filler.unlink()  # space again: the run continues from its last good checkpoint
    resumed = subprocess.run([sys.executable, "-m", "simplegpt", "train", "--resume", str(run), "--max_iters",
                              str(saved + 2), "--quiet"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert load_train_state(run / "last")["step"] == saved + 2


def test_a_resume_keeps_the_whole_records_up_to_its_step_and_drops_one_cut_short(tmp_path):
    """A record the disk or a crash cut off (no newline, no closing brace) ends what a resume keeps."""
    path = tmp_path / METRICS_FILE
    path.write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in (1, 2, 3)) + '{"kind": "tr')
    metrics = Metrics(tmp_path, keep_until=2, tensorboard=False)
    metrics.write({"kind": "train", "step": 3})
    metrics.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    path.write_text(path.read_text() + '{"kind": "tr')
    Metrics(tmp_path, keep_until=5, tensorboard=False).close()
    assert path.read_text().endswith('"step": 3}\n')


def test_the_free_space_check_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, corpus, small_disk):
    disk = small_disk("2m")
    _fill(disk)
    proc = subprocess.run([sys.executable, "-m", "simplegpt", "train", *_args(tmp_path, corpus, disk / "run"),
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"simplegpt train: error: not enough disk space in {disk / 'run'}"), line
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no run folder, write test or lock file


def test_a_resume_counts_the_space_its_own_checkpoints_free(tmp_path, corpus, small_disk):
    """A run's checkpoints replace themselves: resuming needs room for one more copy of last/, not
    for all of them again."""
    disk = small_disk("40m")
    run = disk / "run"
    args = _args(tmp_path, corpus, run, n_layer=2, n_head=4, n_embd=128, block_size=32, max_iters=2, eval_interval=2,
                 sample_tokens=0)
    first = subprocess.run([sys.executable, "-m", "simplegpt", "train", *args, "--quiet"], capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    last = sum(p.stat().st_size for p in (run / "last").rglob("*") if p.is_file())
    _fill(disk, leave=last + (16 << 20) + (1 << 20))  # one more last/, the 16 MiB for the rest, and 1 MiB
    proc = subprocess.run([sys.executable, "-m", "simplegpt", "train", "--resume", str(run), "--max_iters", "4",
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert load_train_state(run / "last")["step"] == 4


def test_a_full_disk_during_prepare_is_one_line_and_leaves_the_old_dataset(tmp_path, corpus, small_disk):
    """prepare alone and inside `train --data`: the shards fill a 1 MiB disk. One line, exit 1, and
    nothing half-written: a dataset already in the folder stays as it was."""
    disk = small_disk("1m")
    big = tmp_path / "big.txt"
    big.write_text(corpus.read_text() * 20)  # 1.2 MB of text: more tokens than the disk holds
    prepare = [sys.executable, "-m", "simplegpt", "prepare", "-t", "char", "--quiet", "-j", "1"]
    old = subprocess.run([*prepare, str(corpus), "-o", str(disk / "ds")], capture_output=True, text=True,
                         timeout=120)
    assert old.returncode == 0, old.stderr
    before = {p.name: p.read_bytes() for p in (disk / "ds").rglob("*") if p.is_file()}
    for command in ([*prepare, str(big), "-o", str(disk / "ds")],
                    [sys.executable, "-m", "simplegpt", "train",
                     *_args(tmp_path, big, tmp_path / "run", data_dir=disk / "ds", max_iters=2), "--quiet"]):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert f"error: the disk of {disk / 'ds'} is full" in line and "No space left on device" in line, line
        assert sorted(p.name for p in disk.iterdir()) == ["ds"]  # no temporary copy left beside it
        assert {p.name: p.read_bytes() for p in (disk / "ds").rglob("*") if p.is_file()} == before
