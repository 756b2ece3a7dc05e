"""Threads from the idle cores (simplegpt.accel.cpu.threads), shared by training and the engine's commands."""

import os
import subprocess
import sys

import pytest
import torch

from simplegpt.accel.cpu.threads import busy_cores, cpu_times, decode_threads, threads_for

# /proc/stat's layout: the machine's line, one line per CPU (user nice system idle iowait irq
# softirq steal guest guest_nice, in clock ticks), then other counters
BEFORE = """cpu  300 0 100 1600 0 0 0 0 0 0
cpu0 100 0 50 800 0 0 0 0 0 0
cpu1 200 0 50 800 0 0 0 0 0 0
cpu2 10 0 10 900 0 0 0 0 0 0
cpu3 0 0 0 5 0
intr 2497336 0 0 0
ctxt 3779996
"""
# 100 ticks later: cpu0 spent 95 of them idle and 5 waiting on I/O (idle too), cpu1 all in user
# and system (a busy process), cpu2 75 idle, cpu3 went offline
AFTER = """cpu  395 0 105 1700 5 0 0 0 0 0
cpu0 100 0 50 895 5 0 0 0 0 0
cpu1 295 0 55 800 0 0 0 0 0 0
cpu2 20 0 25 975 0 0 0 0 0 0

intr 2497999 0 0 0
"""


def test_cpu_times_reads_each_cpu_line():
    assert cpu_times(BEFORE) == {0: (950, 800), 1: (1050, 800), 2: (920, 900), 3: (5, 5)}
    assert cpu_times(AFTER) == {0: (1050, 900), 1: (1150, 800), 2: (1020, 975)}
    assert cpu_times("") == {} and cpu_times("cpu0 x y z w\n") == {}


def test_busy_cores_counts_the_cpus_this_process_may_use():
    assert busy_cores(BEFORE, AFTER, [0, 1]) == pytest.approx(1.0)
    assert busy_cores(BEFORE, AFTER, [0, 1, 2]) == pytest.approx(1.25)
    # a process that may use cpu0 and cpu2 is not held back by the busy cpu1 (a machine-wide figure is)
    assert busy_cores(BEFORE, AFTER, [0, 2]) == pytest.approx(0.25)
    assert busy_cores(BEFORE, AFTER, [1]) == pytest.approx(1.0)
    assert busy_cores(BEFORE, AFTER, [3]) is None  # a CPU the second reading lacks
    assert busy_cores(BEFORE, BEFORE, [0, 1]) is None  # no time passed


def test_threads_for_leaves_the_busy_cores_alone():
    assert threads_for(2, busy_cores(BEFORE, AFTER, [0, 1])) == 1  # one core busy elsewhere: one thread
    assert threads_for(2, busy_cores(BEFORE, AFTER, [0, 2])) == 2
    assert threads_for(3, busy_cores(BEFORE, AFTER, [0, 1, 2])) == 2
    assert [threads_for(2, busy) for busy in (0.0, 0.7, 0.8, 1.7, 2.0)] == [2, 2, 1, 1, 1]
    assert threads_for(16, 3.0) == 13 and threads_for(4, 9.0) == 1


needs_two_cpus = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                    reason="needs CPU affinity and two CPUs")


@needs_two_cpus
def test_decode_threads_takes_a_request_then_omp_num_threads_then_the_idle_cores():
    assert decode_threads(3) == 3
    # pinned to one CPU after torch read OMP_NUM_THREADS=2: the idle cores would say 1
    cpu = min(os.sched_getaffinity(0))
    code = (f"import os; from simplegpt.accel.cpu.threads import auto_threads, decode_threads; "
            f"os.sched_setaffinity(0, {{{cpu}}}); print(decode_threads(), auto_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0 and out.stdout.split() == ["2", "1"], out.stderr
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.split() == ["1", "1"], out.stderr


def test_training_and_decoding_ask_the_same_helper():
    from simplegpt.accel.cpu import threads
    from simplegpt.training import hardware

    assert hardware.auto_threads is threads.auto_threads


def test_generate_takes_threads_and_refuses_a_negative_count(tmp_path, capsys):
    from conftest import make_tiny_gpt
    from simplegpt import get_tokenizer, save_checkpoint
    from simplegpt.cli import main

    tok = get_tokenizer("byte")
    checkpoint = save_checkpoint(tmp_path / "tiny", make_tiny_gpt(vocab_size=tok.vocab_size, scale=8.0), tok)
    base = ["generate", "--checkpoint", str(checkpoint), "--prompt", "ab", "--temperature", "0",
            "--max-new-tokens", "20", "--quiet", "--device", "cpu"]
    outs = []
    for extra in ([], ["--threads", "1"], ["--threads", "3"]):
        assert main([*base, *extra]) == 0
        outs.append(capsys.readouterr().out)
        if extra:
            assert torch.get_num_threads() == int(extra[1])
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) > 3
    assert main([*base, "--threads", "-1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--threads" in err
