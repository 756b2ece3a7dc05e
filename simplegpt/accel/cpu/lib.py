"""Loading the CPU kernels (csrc/*.c) and the one switch that turns them off.

The library is compiled on first use with the machine's C compiler ($CC, else cc) into the cache
folder, and loaded with ctypes: no build step at install. Where there is no compiler, no x86-64 CPU
with AVX2 and FMA, SIMPLEGPT_NATIVE=0 in the environment, or inside a `disabled()` block, `load()`
returns None, `unavailable_reason()` says why, and every caller keeps PyTorch's kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import torch

HERE = Path(__file__).parent / "csrc"
SOURCES = [HERE / "gemv.c", HERE / "train.c"]
HEADERS = [HERE / "simd.h"]
FLAGS = ["-O3", "-mavx2", "-mfma", "-fno-math-errno", "-shared", "-fPIC", "-pthread"]
# train.c's loops use OpenMP; linked against libgomp they share torch's threads (see train.c).
# Where the compiler has no OpenMP they run on the calling thread.
OPENMP = ["-fopenmp"]

MAX_ROWS = 16  # rows up to which the gemv kernel beats PyTorch's BLAS (docs/benchmarks.md)
MAX_INT8_IN = 2**16  # the kernel's buffer for a quantized input row

_lib: ctypes.CDLL | None = None
_reason: str | None = None
_loaded = False
_load_lock = threading.Lock()
_disabled = 0  # depth of disabled() blocks


def cache_dir() -> Path:
    root = os.environ.get("SIMPLEGPT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "simplegpt") / "native"


def unavailable_reason() -> str | None:
    """Why the kernels are not in use (None when they are, or before the first load())."""
    if _disabled:
        return "switched off by simplegpt.accel.cpu.disabled()"
    return _reason


def enabled() -> bool:
    """Whether the kernels are in use now: the library loads and no disabled() block is open."""
    return load() is not None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside this block every caller runs PyTorch's kernels, as with SIMPLEGPT_NATIVE=0 (which
    switches them off for the whole process). Plans made before the block (an Engine's decode plan)
    are not undone."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def _compile(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        for extra in (OPENMP, []):
            out = subprocess.run([cc, *FLAGS, *extra, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True,
                                 text=True, timeout=120)
            if out.returncode == 0:
                break
        else:
            raise RuntimeError(f"{cc} failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
        os.replace(tmp, target)  # atomic: a concurrent loader sees the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it if needed; None where it cannot be used.

    Thread-safe: threads that ask while another builds it wait for the result (a training step
    split over threads must not run some shares without the kernels)."""
    if _disabled:
        return None
    if _loaded:
        return _lib
    with _load_lock:
        if not _loaded:
            _load()
    return _lib


def _load() -> None:
    global _lib, _reason, _loaded
    try:
        if os.environ.get("SIMPLEGPT_NATIVE", "1") == "0":
            raise RuntimeError("SIMPLEGPT_NATIVE=0")
        if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform == "win32":
            raise RuntimeError(f"no kernel for {sys.platform}/{platform.machine()}")
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            raise RuntimeError("the CPU has no AVX2")
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            raise RuntimeError("no C compiler (set CC)")
        code = b"".join(f.read_bytes() for f in [*SOURCES, *HEADERS])
        key = hashlib.sha256(code + " ".join([cc, *FLAGS, *OPENMP]).encode()).hexdigest()[:16]
        target = cache_dir() / f"kernels-{key}.so"
        if not target.is_file():
            _compile(cc, target)
        lib = ctypes.CDLL(str(target))
        lib.sg_init.argtypes, lib.sg_init.restype = [ctypes.c_int], ctypes.c_int
        lib.sg_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4
        lib.sg_gemv.restype = None
        lib.sg_gemv_q8.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4
        if lib.sg_max_rows() != MAX_ROWS:
            raise RuntimeError(f"gemv.c's MAX_ROWS is {lib.sg_max_rows()}, not {MAX_ROWS}")
        lib.sg_gemv_q8.restype = None
        lib.sg_blocks1.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_long] * 2 + [ctypes.c_int] * 2
                                   + [ctypes.c_void_p, ctypes.c_long] + [ctypes.c_int] * 3 + [ctypes.c_float]
                                   + [ctypes.c_void_p, ctypes.c_int])
        lib.sg_blocks1.restype = ctypes.c_int
        lib.sg_block1_scratch.argtypes, lib.sg_block1_scratch.restype = [ctypes.c_int] * 4, ctypes.c_long
        lib.sg_omp_threads.argtypes, lib.sg_omp_threads.restype = [], ctypes.c_int
        lib.sg_gelu_fwd.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long]
        lib.sg_gelu_bwd.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long]
        lib.sg_gelu_fwd.restype = lib.sg_gelu_bwd.restype = None
        lib.sg_attn_fwd.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4 + [ctypes.c_float]
        lib.sg_attn_bwd.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4 + [ctypes.c_float]
        lib.sg_attn_fwd.restype = lib.sg_attn_bwd.restype = ctypes.c_int
        lib.sg_layernorm_fwd.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_long, ctypes.c_int, ctypes.c_float]
        lib.sg_layernorm_bwd.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_long, ctypes.c_int]
        lib.sg_set_sgemm.argtypes, lib.sg_set_sgemm.restype = [ctypes.c_void_p], None
        lib.sg_block_saved_floats.argtypes = [ctypes.c_int] * 5
        lib.sg_block_saved_floats.restype = ctypes.c_long
        lib.sg_block_fwd.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5 + [ctypes.c_float] * 2
        lib.sg_block_bwd.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 5
        lib.sg_block_fwd.restype = lib.sg_block_bwd.restype = ctypes.c_int
        lib.sg_gpt_head_floats.argtypes = [ctypes.c_int] * 4
        lib.sg_gpt_head_floats.restype = ctypes.c_long
        lib.sg_gpt_fwd.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 7 + [ctypes.c_float] + [ctypes.c_void_p] * 4
        lib.sg_gpt_bwd.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_int] * 7 + [ctypes.c_float] + [ctypes.c_void_p] * 3
                                   + [ctypes.c_int])
        lib.sg_gpt_fwd.restype = lib.sg_gpt_bwd.restype = ctypes.c_int
        lib.sg_layernorm_fwd.restype, lib.sg_layernorm_bwd.restype = None, ctypes.c_int
        lib.sg_sqnorm.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2 + [ctypes.c_void_p]
        lib.sg_adamw.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int, ctypes.c_float, ctypes.c_int]
        lib.sg_sqnorm.restype = lib.sg_adamw.restype = ctypes.c_int
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as e:  # AttributeError: a stale library
        _reason = str(e) or type(e).__name__
    else:
        _lib = lib
    _loaded = True  # last: the unlocked check in load() must not see it before _lib is set


