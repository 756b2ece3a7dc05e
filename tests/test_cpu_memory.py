"""keep_freed_memory: a training step's freed buffers are reused without page faults (glibc)."""

import os
import subprocess
import sys

import pytest

from simplegpt.training import cpu_memory

pytestmark = pytest.mark.skipif(cpu_memory._glibc() is None, reason="malloc tuning is glibc-only")

# Training steps of a small model split over two threads, as the trainer runs them on a CPU with
# PyTorch's own ops (SIMPLEGPT_NATIVE=0: every activation and gradient a fresh tensor; the native
# whole-model step allocates little): page faults per step with glibc's defaults first, then inside
# keep_freed_memory (a fresh interpreter, since glibc's adaptive thresholds cannot be put back).
# glibc's mmap threshold starts at 128 KiB and grows as mapped blocks are freed, at moments that
# vary between processes (250-1,150 faults a step in 25 runs, a few under the test's 200). It is
# held at that start value here (GLIBC_TUNABLES), as in a process whose threshold has not grown
# yet, so the default side faults every time; keep_freed_memory sets its own threshold over it.
FIXED_DEFAULT = "glibc.malloc.mmap_threshold=131072"
SCRIPT = """
import resource, torch
from simplegpt.training.cpu_memory import keep_freed_memory
from simplegpt.training.core_shards import CoreShards
from simplegpt.model import GPT, GPTConfig
torch.manual_seed(0)
torch.set_num_threads(1)
model = GPT(GPTConfig(vocab_size=65, n_positions=64, n_embd=128, n_layer=4, n_head=4))
shards = CoreShards(model, 2)
x = torch.randint(0, 65, (12, 64))
def faults_per_step():
    for _ in range(3):
        shards.forward_backward((x, x)); model.zero_grad(set_to_none=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        shards.forward_backward((x, x)); model.zero_grad(set_to_none=True)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
default = faults_per_step()
with keep_freed_memory():
    kept = faults_per_step()
print(default, kept)
"""


def test_a_training_step_stops_faulting_its_buffers_back_in():
    env = {**os.environ, "SIMPLEGPT_NATIVE": "0", "GLIBC_TUNABLES": FIXED_DEFAULT}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    default, kept = map(float, out.stdout.split())
    assert default > 200  # the workload does fault by default, or this test would prove nothing
    assert kept < default / 5  # measured: ~15,000-16,000 faults per step so, 10-50 inside


def test_disabled_changes_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: calls.append(1))
    with cpu_memory.keep_freed_memory(enabled=False):
        pass
    assert calls == []
