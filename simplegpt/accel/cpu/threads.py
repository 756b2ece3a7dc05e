"""How many CPU threads to compute on: the cores this process may use that other processes leave idle.

Training (simplegpt.training.hardware) and the engine's commands (simplegpt.cli) both
ask `auto_threads()`. Threads that outnumber the free cores wait for each other: on a 2-core
machine with one other busy process, 2 OpenMP threads trained ~7x slower than 1 (docs/training.md),
and 2 decoding threads ran at 50-73 tokens/s where 1 ran at 2,632-2,714 (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import time

import torch

STAT = "/proc/stat"


def auto_threads(seconds: float = 0.2) -> int:
    """The cores this process may use (its affinity) less those other processes kept busy over the
    next `seconds` (from /proc/stat on Linux; this process's own CPU time does not count), at least 1.
    Where /proc/stat is unreadable the load average is the fallback, though it lags: it still counts
    a job that ended a minute ago."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    before, own_before = _read_stat(), os.times()
    time.sleep(seconds)
    after, own_after = _read_stat(), os.times()
    busy = None if before is None or after is None else busy_cores(before, after, cpus)
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
    else:
        own = (own_after.user + own_after.system - own_before.user - own_before.system)
        busy -= own / max(own_after.elapsed - own_before.elapsed, 1e-3)
    return threads_for(len(cpus), busy)


def decode_threads(requested: int = 0) -> int:
    """Threads for decoding on the CPU: `requested` when positive, else torch's count where
    OMP_NUM_THREADS sets it, else auto_threads() (0.2 s to measure)."""
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return torch.get_num_threads()
    return auto_threads()


def threads_for(cores: int, busy: float) -> int:
    """Threads for `cores` usable cores of which `busy` (a float: cores' worth of time) are taken by
    others: the idle ones, a core counting as idle when at least a quarter of it is, at least 1."""
    return max(1, min(cores, int(cores - busy + 0.75)))


def busy_cores(before: str, after: str, cpus: list[int]) -> float | None:
    """How many of `cpus` (CPU numbers) were busy between two readings of /proc/stat (its text), in
    cores' worth of time; None where the readings have none of these CPUs or no time passed."""
    first, second = cpu_times(before), cpu_times(after)
    busy, seen = 0.0, False
    for cpu in cpus:
        if cpu not in first or cpu not in second:
            continue
        total, idle = second[cpu][0] - first[cpu][0], second[cpu][1] - first[cpu][1]
        if total > 0:
            busy += (total - idle) / total
            seen = True
    return busy if seen else None


def cpu_times(stat: str) -> dict[int, tuple[int, int]]:
    """Per CPU number, (all, idle) clock ticks since boot from /proc/stat's text (its `cpuN` lines):
    idle counts idle and iowait; all counts user to steal (guest time is already in user)."""
    times = {}
    for line in stat.splitlines():
        name, *fields = line.split() or [""]
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        try:
            ticks = [int(x) for x in fields[:8]]
        except ValueError:
            continue
        if len(ticks) >= 4:
            times[int(name[3:])] = sum(ticks), ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return times


def _read_stat() -> str | None:
    try:
        with open(STAT, encoding="ascii") as f:
            return f.read()
    except (OSError, ValueError):
        return None
