"""What the trainer needs to know of the machine: the compute dtype, CPU threads, how to split a
batch over cores, and the peak FLOP/s that MFU divides by."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..accel.cpu.threads import auto_threads as auto_threads  # noqa: F401 (re-exported: the trainer's threads)
from ..config import TrainConfig
from ..errors import ConfigError

# Peak dense bf16 FLOP/s of common GPUs, for MFU (the numbers of nanoGPT / the vendor sheets).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
                  "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}

# float32 FLOPs per cycle per x86-64 core, widest first: FMA units x lanes x 2 (a multiply and an add).
VECTOR_FLOPS_PER_CYCLE = ((64, "AVX-512", {"avx512f"}), (32, "AVX2 FMA", {"avx2", "fma"}), (16, "AVX", {"avx"}))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for a config's dtype name; 'auto' is bf16 (or fp16) on CUDA, fp32 elsewhere.
    ConfigError for float16 off CUDA (it needs loss scaling)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError("dtype float16 needs a CUDA device (loss scaling); use bfloat16 or float32")
    return dtype


def peak_flops(cfg: TrainConfig, device: torch.device) -> float:
    """The FLOP/s MFU divides by (see mfu_peak), on torch's current number of threads."""
    return mfu_peak(cfg, device, torch.get_num_threads())[0]


def mfu_peak(cfg: TrainConfig, device: torch.device, threads: int) -> tuple[float, str]:
    """The FLOP/s MFU divides by, and what it is: configured (peak_flops), a known GPU's bf16 peak,
    or on a CPU the float32 peak of the `threads` cores the run uses.

    The CPU peak is the higher of two figures. A timed matmul alone is lowered by whatever else runs
    on the machine (a run started beside a busy process measured too low and logged MFU 1.18);
    the cores' vector width x FMA units x clock (cpu_vector_peak) is a ceiling that load cannot lower."""
    if cfg.peak_flops:
        return cfg.peak_flops, f"the configured peak_flops, {cfg.peak_flops / 1e12:.3g} TFLOP/s"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops, f"the {key}'s bf16 peak, {flops / 1e12:.0f} TFLOP/s"
        return 100e12, f"an assumed 100 TFLOP/s ({name} is not in the table; set peak_flops)"
    measured = _matmul_rate()
    vector = cpu_vector_peak(threads)
    cores = f"{threads} core{'s' if threads != 1 else ''}"
    if vector is not None and vector[0] >= measured:
        return vector[0], f"the float32 peak of {cores}, {vector[0] / 1e9:,.0f} GFLOP/s ({vector[1]})"
    return measured, f"the float32 peak of {cores}, {measured / 1e9:,.0f} GFLOP/s (a timed matmul)"


def cpu_vector_peak(threads: int) -> tuple[float, str] | None:
    """The float32 FLOP/s of `threads` x86-64 cores at their top clock, from /proc/cpuinfo's flags
    (AVX-512: 2 FMA units x 16 lanes x 2 FLOPs = 64 per cycle, AVX2 + FMA: 32, AVX: 16) and
    cpufreq's maximum clock, else cpuinfo's; with a description. None where unknown (not Linux x86)."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    known = [(n, isa) for n, isa, needs in VECTOR_FLOPS_PER_CYCLE if needs <= flags]
    if not known:
        return None
    per_cycle, isa = known[0]
    try:
        hz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) * 1e3
    except (OSError, ValueError):
        mhz = [float(ln.split(":", 1)[1]) for ln in info.splitlines() if ln.startswith("cpu MHz")]
        hz = max(mhz, default=0.0) * 1e6
    if hz <= 0:
        return None
    return threads * per_cycle * hz, f"{isa}, {per_cycle} FLOPs/cycle at {hz / 1e9:.2f} GHz"


def _matmul_rate() -> float:
    """The rate of a large float32 matmul on torch's threads now: the best of short rounds over a fifth
    of a second, so that a moment of load from elsewhere does not set it."""
    # Its own generator: drawing from the global one would shift a resumed run's dropout stream.
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    torch.mm(a, a)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, a)
        best = max(best, 4 * 2 * 512**3 / (time.perf_counter() - t0))
    return best


def core_shards(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, threads: int) -> int:
    """How many ways CoreShards splits each batch (1 = not at all); ConfigError for a cpu_shards that
    cannot apply. Auto (0) shards fp32 CPU runs without dropout or torch.compile: one share per
    thread, at most one per sequence of the batch."""
    fits = device.type == "cpu" and dtype == torch.float32 and not cfg.compile and cfg.dropout == 0.0
    if cfg.cpu_shards == 0:
        return min(threads, cfg.batch_size) if fits else 1
    if cfg.cpu_shards > 1 and not fits:
        raise ConfigError("cpu_shards > 1 needs float32 training on the CPU without dropout or compile "
                          "(dropout draws from one random stream, which threads would share out of order)")
    if cfg.cpu_shards > cfg.batch_size:
        raise ConfigError(f"cpu_shards ({cfg.cpu_shards}) cannot exceed batch_size ({cfg.batch_size})")
    return cfg.cpu_shards
