"""Device choice, shared by the tutorial API, the trainer, the engine's commands and checkpoint loading,
and the CPU allocator setting the trainer uses."""

from __future__ import annotations

import ctypes
import os
import sys

import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def default_device() -> str:
    """cuda if available, then mps, then cpu (the tutorial hard-coded 'cuda')."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' or a device name -> a torch.device that exists here; ValueError saying what to use instead."""
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device(default_device())
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {name!r} is not a device: use {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine; use cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available on this machine; use cpu (or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(device)!r} is not supported: use {DEVICE_CHOICES}")
    return device


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest allowed value on 64-bit systems
_TRIM_THRESHOLD = 2**30
_allocator_kept = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed blocks of up to 32 MiB instead of returning them to the kernel.

    By default glibc serves big blocks with fresh mmap()s and hands freed memory at the top of the
    heap back to the kernel, so the activations of each CPU training step arrive as new pages that
    are faulted in again, page by page: ~1,000-3,000 page faults per step of the benchmark model,
    ~15-25% of its step time (docs/benchmarks.md). With this setting the
    process keeps its peak memory (RSS does not shrink after a big step) and the faults are gone.
    Linux with glibc only; SIMPLEGPT_MALLOC_TUNING=0 turns it off. True when the setting is in effect.
    """
    global _allocator_kept
    if _allocator_kept:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("SIMPLEGPT_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError where the C library is not glibc
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _allocator_kept = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _allocator_kept
