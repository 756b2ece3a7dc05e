"""A checkpoint survives a crash at every point of its swap, and its data is on disk before it is renamed in.

The faults are injected where they hurt: os.replace and shutil.rmtree, the calls atomic_dir makes
to swap a new copy in, raise (as a second Ctrl-C would) or end the process (os._exit, as SIGKILL).
See docs/reliability.md for the promises these tests stand behind.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from simplegpt.checkpoint import load_checkpoint, load_train_state, read_checkpoint_config, recover, save_checkpoint
from simplegpt.config import TrainConfig
from simplegpt.errors import ConfigError
from simplegpt.tokenizer import ByteTokenizer
from simplegpt.trainer import train
from test_checkpoint import _model, train_state


class Crash(BaseException):
    """An interruption the code under test must not catch (as KeyboardInterrupt)."""


def _is_marker(p: Path) -> bool:
    return p.name.startswith(".last.old-")


def _inject(monkeypatch, point: str) -> None:
    """Make the next save of `last` stop at `point` of its swap."""
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def replace(src, dst):
        src, dst = Path(src), Path(dst)
        moving_aside = dst.name == "old" and _is_marker(dst.parent)
        renaming_in = src.name.startswith(".last.tmp-") and dst.name == "last"
        if (point == "marked" and moving_aside) or (point == "first" and renaming_in):
            raise Crash(point)
        real_replace(src, dst)
        if (point == "aside" and moving_aside) or (point == "renamed" and renaming_in):
            raise Crash(point)

    def rmtree(path, *args, **kw):
        if point == "cleanup" and _is_marker(Path(path)):
            real_rmtree(Path(path) / "old" / "tokenizer")  # half removed
            raise Crash(point)
        real_rmtree(path, *args, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)


class FailingTokenizer(ByteTokenizer):
    def save(self, directory):
        raise RuntimeError("disk trouble while writing")


@pytest.mark.parametrize("point", ["first", "marked", "aside", "renamed", "cleanup"])
def test_a_save_interrupted_at_any_point_of_the_swap_loses_no_complete_checkpoint(tmp_path, monkeypatch, point):
    last, new = tmp_path / "last", _model(2)
    if point != "first":  # "first": the interrupted save is the first of `last`
        save_checkpoint(last, _model(1), ByteTokenizer(), metadata={"step": 1}, train_state=train_state(1))
    _inject(monkeypatch, point)
    with pytest.raises(Crash):
        save_checkpoint(last, new, ByteTokenizer(), metadata={"step": 2}, train_state=train_state(2))
    monkeypatch.undo()
    # The new copy was complete and synced before the swap began: it is the one every loader finds.
    assert read_checkpoint_config(last)["step"] == 2
    assert load_train_state(last)["step"] == 2
    assert torch.equal(load_checkpoint(last).model.transformer.wte.weight, new.transformer.wte.weight)
    # A save that fails while writing removes nothing complete: it first puts the newest copy back.
    with pytest.raises(RuntimeError, match="disk trouble"):
        save_checkpoint(last, _model(3), FailingTokenizer(), metadata={"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert load_checkpoint(last).metadata["step"] == 2 and load_train_state(last)["step"] == 2


@pytest.mark.parametrize("point", ["first", "marked", "aside", "renamed", "cleanup"])
def test_recover_puts_the_newest_complete_copy_back_in_place(tmp_path, monkeypatch, point):
    last = tmp_path / "last"
    if point != "first":
        save_checkpoint(last, _model(1), ByteTokenizer(), metadata={"step": 1})
    _inject(monkeypatch, point)
    with pytest.raises(Crash):
        save_checkpoint(last, _model(2), ByteTokenizer(), metadata={"step": 2})
    monkeypatch.undo()
    assert recover(last) == last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert (last / "config.json").is_file() and read_checkpoint_config(last)["step"] == 2
    assert recover(tmp_path / "never-written") is None


def test_files_and_folders_are_synced_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "last", _model(1), ByteTokenizer(), train_state=train_state(1))
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", str(src), str(dst))),
                                                         real_replace(src, dst))[1])
    save_checkpoint(tmp_path / "last", _model(2), ByteTokenizer(), train_state=train_state(2))
    monkeypatch.undo()
    [swap_in] = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(tmp_path / "last")]
    tmp = events[swap_in][1]
    first_move = min(i for i, e in enumerate(events) if e[0] == "replace" and not e[1].startswith(tmp + "/"))
    synced_before = {e[1] for e in events[:first_move] if e[0] == "fsync"}
    written = {tmp + "/" + p.relative_to(tmp_path / "last").as_posix() for p in (tmp_path / "last").rglob("*")}
    assert written | {tmp} <= synced_before  # every file and folder, and the new copy itself
    assert str(tmp_path) in synced_before  # the marker that says the copy is complete
    assert ("fsync", str(tmp_path)) in events[swap_in + 1:]  # the renames themselves


@pytest.mark.parametrize("resume_from", ["last", "run folder"])
def test_a_run_killed_mid_swap_is_not_restarted_and_resumes_bit_exactly(tmp_path, shakespeare_path, resume_from):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_path.read_text()[:60_000])
    cfg = TrainConfig(data=str(corpus), data_dir=str(tmp_path / "data"), n_layer=1, n_head=2, n_embd=16,
                      block_size=16, batch_size=4, max_iters=9, eval_interval=4, eval_iters=2, log_interval=1,
                      warmup_iters=2, sample_tokens=8, out_dir=str(tmp_path / "run"), num_threads=1, plot=False,
                      tensorboard=False, peak_flops=1e12, dropout=0.1, grad_accum_steps=2)
    full = train(cfg.replace(out_dir=str(tmp_path / "full")), progress=False)
    first = train(cfg, stop_at=5, progress=False)
    last = tmp_path / "run" / "last"
    # Another save of last/ is killed (no cleanup at all) between moving last/ aside and renaming the new copy in.
    script = textwrap.dedent(f"""
        import os
        from simplegpt.checkpoint import load_checkpoint, load_train_state, save_checkpoint

        real = os.replace
        def replace(src, dst):
            real(src, dst)
            if str(dst).endswith("/old"):
                os._exit(9)
        ck, state = load_checkpoint({str(last)!r}), load_train_state({str(last)!r})
        os.replace = replace
        save_checkpoint({str(last)!r}, ck.model, ck.tokenizer, metadata=ck.metadata, train_state=state)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9 and not last.exists(), proc.stderr
    with pytest.raises(ConfigError, match="stopped at step 5/9"):
        train(cfg, progress=False)  # the same command again must not start over (and delete both copies)
    resumed = train(cfg, resume=last if resume_from == "last" else last.parent, progress=False)
    assert first.losses + resumed.losses == full.losses
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".last")]
    a, b = load_checkpoint(tmp_path / "full" / "last").model, load_checkpoint(last).model
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_reader_during_saves_sees_one_whole_copy_every_time(tmp_path):
    """A process saves `last` over and over (its weights, metadata and train state all say the
    step) while this one loads it in a loop: every load is one copy, whole, and none fails."""
    last = tmp_path / "last"
    save_checkpoint(last, _model(1), ByteTokenizer(), metadata={"step": 0}, train_state=train_state(0))
    script = textwrap.dedent(f"""
        import time

        import torch
        from simplegpt.checkpoint import save_checkpoint
        from simplegpt.tokenizer import ByteTokenizer
        from test_checkpoint import _model, train_state

        model, state = _model(1), train_state(0)
        for step in range(1, 61):
            with torch.no_grad():
                model.transformer.wte.weight.fill_(step)
            save_checkpoint({str(last)!r}, model, ByteTokenizer(), metadata={{"step": step}},
                            train_state={{**state, "step": step}})
            time.sleep(0.02)  # a save can take 15 ms: the reader's loads must fall between and during saves
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    saver = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    loads, failures, steps = 0, [], set()
    try:
        while saver.poll() is None:
            try:
                ck = load_checkpoint(last)
                step = ck.metadata["step"]
                assert step == 0 or ck.model.transformer.wte.weight[0, 0].item() == step, "weights of another copy"
                assert load_train_state(last)["step"] >= step
                assert read_checkpoint_config(last)["step"] >= step
                steps.add(step)
            except Exception as e:  # noqa: BLE001 - every failure counts, whatever its type
                failures.append(f"{type(e).__name__}: {e}")
            loads += 1
    finally:
        saver.kill()
    assert saver.wait() == 0, saver.stderr.read()[-2000:]
    assert failures == [], f"{len(failures)} of {loads} loads failed: {failures[:3]}"
    assert len(steps) >= 3  # the loads did overlap the saves


def _tiny_run(tmp_path, shakespeare_path) -> tuple[TrainConfig, list[str]]:
    """A tiny run's config, and the same as `simplegpt train` arguments."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_path.read_text()[:60_000])
    settings = dict(data=str(corpus), data_dir=str(tmp_path / "data"), n_layer=1, n_head=2, n_embd=16, block_size=16,
                    batch_size=4, max_iters=6, eval_interval=3, eval_iters=2, log_interval=1, sample_tokens=8,
                    out_dir=str(tmp_path / "run"), num_threads=1, peak_flops=1e12)
    cfg = TrainConfig(**settings, plot=False, tensorboard=False)
    return cfg, [a for k, v in {**settings, "plot": "false"}.items() for a in (f"--{k}", str(v))]


def _killed_mid_swap(last: Path, pid: int) -> None:
    """What a writer with this pid leaves when killed between moving last/ aside and renaming its
    complete new copy in (step 3 of simplegpt.atomic), a minute ago."""
    tmp, marker = last.with_name(f".last.tmp-0badf00d.pid{pid}"), last.with_name(f".last.old-0badf00d.pid{pid}")
    shutil.copytree(last, tmp)
    marker.mkdir()
    os.replace(last, marker / "old")
    for p in (tmp, marker, marker / "old"):
        os.utime(p, (p.stat().st_atime - 60, p.stat().st_mtime - 60))


def test_init_from_and_resume_auto_find_last_mid_swap_even_when_the_writers_pid_is_reused(
        tmp_path, shakespeare_path, capsys):
    from simplegpt.cli import main
    from simplegpt.training.start import init_model

    cfg, args = _tiny_run(tmp_path, shakespeare_path)
    train(cfg, stop_at=3, progress=False)
    last = tmp_path / "run" / "last"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _killed_mid_swap(last, int(gone.stdout))
    # --init-from reads the newest complete copy, as --resume does
    model, tokenizer, note = init_model(TrainConfig(init_from=str(last), block_size=16), torch.device("cpu"))
    assert torch.equal(model.transformer.wte.weight, load_checkpoint(last).model.transformer.wte.weight)
    assert not last.exists() and note == f"initialized from {last}"  # it only read

    # The dead writer's pid now belongs to a live process that started after it: its copy is a crash's.
    live = subprocess.Popen(["sleep", "120"])
    try:
        for p in list(last.parent.glob(".last.*")):
            os.replace(p, p.with_name(p.name.replace(f".pid{gone.stdout.strip()}", f".pid{live.pid}")))
        assert main(["train", *args, "--resume", "auto"]) == 0, capsys.readouterr().err
    finally:
        live.kill()
        live.wait()
    assert read_checkpoint_config(last)["step"] == 6
    assert not list(last.parent.glob(".last.*"))  # the crash's leftovers were cleaned up


def test_resume_of_a_run_whose_first_save_of_last_was_killed_gives_advice_that_works(
        tmp_path, shakespeare_path, capsys):
    from simplegpt.cli import main

    cfg, _ = _tiny_run(tmp_path, shakespeare_path)
    run = tmp_path / "run"
    train(cfg, stop_at=3, progress=False)
    shutil.rmtree(run / "last")  # killed while writing its first copy (step 1): no complete last/
    (run / ".last.tmp-0badf00d.pid999999999").mkdir()
    assert (run / "best").is_dir()
    assert main(["train", "--resume", str(run)]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"{run} is a run folder with no last/ checkpoint to resume" in line
    assert "start the run again without --resume" in line and f"--init-from {run / 'best'}" in line
    assert train(cfg, progress=False).step == 6  # the advice works: the same run starts again
    assert read_checkpoint_config(run / "last")["step"] == 6


def test_a_copy_left_by_a_writer_that_seemed_alive_never_replaces_a_newer_save(tmp_path):
    """A writer killed mid-swap whose pid a live process holds (where its start time cannot be
    read, or it started first) is skipped by the next save; once that process ends, its older copy
    must not win over the newer checkpoint, for readers or for the next save's recovery."""
    last = tmp_path / "last"
    save_checkpoint(last, _model(1), ByteTokenizer(), metadata={"step": 1})
    live = subprocess.Popen(["sleep", "120"])  # started before the leftovers: it looks like their writer
    try:
        time.sleep(0.1)
        _killed_mid_swap(last, live.pid)
        for p in last.parent.glob(".last.*"):
            os.utime(p)  # made now, after the process started
        save_checkpoint(last, _model(2), ByteTokenizer(), metadata={"step": 2})  # the leftovers are left alone
        assert len(list(tmp_path.glob(".last.*"))) == 2
    finally:
        live.kill()
        live.wait()
    assert read_checkpoint_config(last)["step"] == 2
    assert recover(last) == last and read_checkpoint_config(last)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


@pytest.mark.parametrize("part", ["optimizer", "sampler"])
def test_a_resigned_train_state_whose_parts_do_not_fit_is_one_line(tmp_path, shakespeare_path, part):
    from simplegpt.errors import CheckpointError

    cfg, _ = _tiny_run(tmp_path, shakespeare_path)
    train(cfg, stop_at=3, progress=False)
    last = tmp_path / "run" / "last"
    state = load_train_state(last)
    if part == "optimizer":  # a parameter group of another model: one parameter too many
        state["optimizer"]["param_groups"][0]["params"].append(10**6)
    else:  # numpy's bit generator state of another kind
        state["sampler"]["rng"] = {"bit_generator": "NoSuchGenerator", "state": {}}
    ck = load_checkpoint(last)
    save_checkpoint(last, ck.model, ck.tokenizer, metadata=ck.metadata, train_state=state)  # digests re-signed
    with pytest.raises(CheckpointError, match=f"train_state.pt is damaged: its {part} state cannot be restored"):
        train(cfg, resume=last, progress=False)
    assert read_checkpoint_config(last)["step"] == 3  # nothing saved was lost
