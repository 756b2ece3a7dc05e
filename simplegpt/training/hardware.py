"""What the trainer needs to know of the machine: the compute dtype, the CUDA backends' settings, CPU
threads, how to split a batch over cores, and the peak FLOP/s that MFU divides by."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import torch

from ..accel.cpu.threads import auto_threads as auto_threads  # noqa: F401 (re-exported: the trainer's threads)
from ..config import TrainConfig
from ..console import count
from ..errors import ConfigError

# Dense half-precision tensor-core peaks, FLOP/s per device: bf16 (fp16 on V100 and T4, which have no
# bf16), from NVIDIA's datasheets (H100, H200, GH200, A100, A30, A10, L40, L40S, L4, V100, T4) and its
# Ampere GA102 / Ada Lovelace whitepapers (GeForce RTX 3090 / 4090: bf16 with float32 accumulation).
# The datasheets headline the figure "with sparsity"; dense training runs at half of it.
# (label, pattern, FLOP/s), matched in this order against the upper-cased torch.cuda.get_device_name,
# the specific before the general: "H100 PCIe" before "H100", "A100" never taken for "A10", "L40S"
# and "L40" never for "L4"; a name matching none (an A10G, an RTX 3090 Ti, a laptop GPU) is unknown.
GPU_PEAKS: tuple[tuple[str, str, float], ...] = (
    ("GH200", r"\bGH200\b", 989e12),
    ("H200 NVL", r"\bH200\b.*\bNVL\b", 835e12),
    ("H200 SXM", r"\bH200\b", 989e12),
    ("H100 NVL", r"\bH100\b.*\bNVL\b", 835e12),
    ("H100 PCIe", r"\bH100\b.*\bPCIE\b", 756e12),
    ("H100 SXM", r"\bH100\b", 989e12),
    ("A100", r"\bA100\b", 312e12),
    ("A30", r"\bA30\b", 165e12),
    ("A10", r"\bA10\b", 125e12),
    ("L40S", r"\bL40S\b", 362e12),
    ("L40", r"\bL40\b", 181e12),
    ("L4", r"\bL4\b", 121e12),
    ("RTX 4090", r"\bRTX 4090$", 165e12),
    ("RTX 3090", r"\bRTX 3090$", 71e12),
    ("V100S", r"\bV100S\b", 130e12),
    ("V100 PCIe", r"\bV100\b.*\bPCIE\b", 112e12),
    ("V100 SXM", r"\bV100\b", 125e12),
    ("T4", r"\bT4\b", 65e12),
)
# label -> FLOP/s, for readers of the table alone
GPU_PEAK_FLOPS = {label: flops for label, _, flops in GPU_PEAKS}

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


def configure_backends(device: torch.device) -> None:
    """Set up PyTorch's CUDA backends for training on `device`, process-wide; nothing off CUDA.

    - TF32 for float32 matmuls (what runs outside bf16 autocast: the float32 loss's matmuls, a float32
      run) through torch.set_float32_matmul_precision("high"). Not the per-backend
      torch.backends.cuda.matmul.fp32_precision alone: in this torch, a matmul precision set only that
      way makes torch.get_float32_matmul_precision() raise (legacy and new settings mixed), and
      torch.compile's autotuning calls it; "high" sets the new setting to "tf32" as well.
    - TF32 for cuDNN convolutions (torch.backends.cudnn.conv.fp32_precision; allow_tf32 before torch 2.9).
    - The flash and memory-efficient kernels of F.scaled_dot_product_attention switched on (the
      defaults, unless something switched them off). SDPA takes flash attention when the inputs allow
      it: bf16/fp16, no attn_mask (is_causal instead), a head size that is a multiple of 8 up to 256, a
      GPU of compute capability 8.0 or later. The trainer's packed batches (no padding) call it that way;
      padded batches pass a mask and take the memory-efficient kernel."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high")
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9: per-operation precision
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_flash_sdp(True)
    torch.backends.cuda.enable_mem_efficient_sdp(True)


def gpu_peak_flops(device_name: str) -> tuple[str, float] | None:
    """The (label, dense bf16 FLOP/s) of GPU_PEAKS for a torch.cuda.get_device_name, e.g.
    "NVIDIA H100 80GB HBM3" -> ("H100 SXM", 989e12), "NVIDIA H100 PCIe" -> ("H100 PCIe", 756e12).
    None for a device not in the table, and for a MIG slice (a part of the GPU's peak)."""
    name = " ".join(device_name.upper().split())
    if re.search(r"\bMIG\b", name):
        return None
    return next(((label, flops) for label, pattern, flops in GPU_PEAKS if re.search(pattern, name)), None)


def peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    """The FLOP/s MFU divides by (see device_peak_flops), on torch's current number of threads; None
    on a GPU that is not in the table and no peak_flops set."""
    return device_peak_flops(cfg, device, torch.get_num_threads())[0]


def device_peak_flops(cfg: TrainConfig, device: torch.device, threads: int) -> tuple[float | None, str]:
    """The FLOP/s MFU divides by, and what it is: configured (peak_flops), a known GPU's dense bf16 peak
    (GPU_PEAKS; a float32 run is measured against it too), or on a CPU the float32 peak of the
    `threads` cores the run uses. On a GPU not in the table: None and a line saying to set peak_flops
    (MFU is then not computed: see mfu).

    The CPU peak is the cores' vector width x FMA units x clock (cpu_vector_peak), a ceiling that load
    cannot lower; only where that is unknown (not Linux x86) a timed matmul (~0.2 s of the run's
    start), which whatever else runs on the machine lowers (a run started beside a busy process
    measured too low and logged MFU 1.18)."""
    if cfg.peak_flops:
        return cfg.peak_flops, f"the configured peak_flops, {cfg.peak_flops / 1e12:.3g} TFLOP/s"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = gpu_peak_flops(name)
        if known is None:
            return None, (f"no known peak: {name} is not in simplegpt's table of GPU peaks, so MFU is not "
                          "computed; set peak_flops (--peak_flops) to the device's dense bf16 peak FLOP/s")
        label, flops = known
        return flops, f"the {label}'s dense bf16 peak, {flops / 1e12:.0f} TFLOP/s"
    if device.type != "cpu":
        return None, (f"no known peak for a {device.type} device, so MFU is not computed; set peak_flops "
                      "to the device's peak FLOP/s")
    vector = cpu_vector_peak(threads)
    cores = count(threads, "core")
    if vector is not None:
        return vector[0], f"the float32 peak of {cores}, {vector[0] / 1e9:,.0f} GFLOP/s ({vector[1]})"
    measured = _matmul_rate()
    return measured, f"the float32 peak of {cores}, {measured / 1e9:,.0f} GFLOP/s (a timed matmul)"


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilization, a fraction: flops_per_token (GPT.flops_per_token: 6N + 12·L·C·T, PaLM's
    appendix B) x tokens/s over the peak FLOP/s; at most 1.0 (a peak set too low never reads as
    more than 100%). None where the peak is unknown."""
    if peak is None or not math.isfinite(peak) or peak <= 0:
        return None
    return min(flops_per_token * tokens_per_s / peak, 1.0)


def format_mfu(value: float | None) -> str:
    """An MFU for people: "41.3%", or "unknown" where it was not computed."""
    return "unknown" if value is None else f"{value:.1%}"


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
    dropout = cfg.dropout or (cfg.lora and cfg.lora_dropout)
    fits = device.type == "cpu" and dtype == torch.float32 and not cfg.compile and not dropout
    if cfg.cpu_shards == 0:
        return min(threads, cfg.batch_size) if fits else 1
    if cfg.cpu_shards > 1 and not fits:
        raise ConfigError("cpu_shards > 1 needs float32 training on the CPU without dropout or compile "
                          "(dropout draws from one random stream, which threads would share out of order)")
    if cfg.cpu_shards > cfg.batch_size:
        raise ConfigError(f"cpu_shards ({cfg.cpu_shards}) cannot exceed batch_size ({cfg.batch_size})")
    return cfg.cpu_shards
