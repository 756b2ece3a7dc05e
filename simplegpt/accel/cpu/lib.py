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

from .slots import BLOCK_SLOTS

HERE = Path(__file__).parent / "csrc"
# one family of ops a file (each op written once, used by decoding and training alike), then the
# block and the whole model composed of them
SOURCES = [HERE / f"{name}.c" for name in ("pool", "gemv", "layernorm", "gelu", "attention", "matmul", "adamw",
                                           "block", "model")]
HEADERS = [HERE / f"{name}.h" for name in ("api", "kernels", "simd", "slots")]
# only api.h's functions are exported (SG_API); the rest can be inlined across the files' own calls
FLAGS = ["-O3", "-mavx2", "-mfma", "-fno-math-errno", "-shared", "-fPIC", "-pthread", "-fvisibility=hidden"]
# The training kernels' loops use OpenMP; linked against libgomp they share torch's threads (see
# csrc/pool.c). Where the compiler has no OpenMP they run on the calling thread.
OPENMP = ["-fopenmp"]

_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
# Every function of csrc/api.h: name -> (result, arguments) as ctypes types (pointers are c_void_p;
# tests/test_native_layout.py checks this table against api.h's declarations).
SIGNATURES: dict[str, tuple[type | None, list[type]]] = {
    "sg_init": (_I, [_I]),
    "sg_omp_threads": (_I, []),
    "sg_max_rows": (_I, []),
    "sg_gemv": (None, [_P] * 4 + [_I] * 4),
    "sg_gemv_q8": (None, [_P] * 5 + [_I] * 4),
    "sg_layernorm_fwd": (None, [_P] * 6 + [_L, _I, _F]),
    "sg_layernorm_bwd": (_I, [_P] * 9 + [_L, _I]),
    "sg_gelu_fwd": (None, [_P] * 2 + [_L]),
    "sg_gelu_bwd": (None, [_P] * 3 + [_L]),
    "sg_attn_fwd": (_I, [_P] * 3 + [_I] * 4 + [_F]),
    "sg_attn_bwd": (_I, [_P] * 5 + [_I] * 4 + [_F]),
    "sg_set_sgemm": (None, [_P]),
    "sg_block_slot": (ctypes.c_char_p, [_I]),
    "sg_block1_scratch": (_L, [_I] * 4),
    "sg_blocks1": (_I, [_P] * 5 + [_L] * 2 + [_I] * 2 + [_P, _L] + [_I] * 3 + [_F, _P, _I]),
    "sg_block_saved_floats": (_L, [_I] * 5),
    "sg_block_fwd": (_I, [_P] * 4 + [_I] * 5 + [_F] * 2),
    "sg_block_bwd": (_I, [_P] * 6 + [_I] * 5),
    "sg_gpt_head_floats": (_L, [_I] * 4),
    "sg_gpt_fwd": (_I, [_P] * 2 + [_I] * 7 + [_F] + [_P] * 4),
    "sg_gpt_bwd": (_I, [_P] * 2 + [_I] * 7 + [_F] + [_P] * 3 + [_I]),
    "sg_sqnorm": (_I, [_P] * 2 + [_I] * 2 + [_P]),
    "sg_adamw": (_I, [_P] * 6 + [_I, _F, _I]),
}

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
        for name, (restype, argtypes) in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        if lib.sg_max_rows() != MAX_ROWS:
            raise RuntimeError(f"the library's MAX_ROWS is {lib.sg_max_rows()}, not {MAX_ROWS}")
        slots = [lib.sg_block_slot(i) for i in range(len(BLOCK_SLOTS) + 1)]
        if slots != [f"{mod}.{name}".encode() for mod, name in BLOCK_SLOTS] + [None]:
            raise RuntimeError(f"the library's block slots {slots[:-1]} are not slots.py's {BLOCK_SLOTS}")
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as e:  # AttributeError: a stale library
        _reason = str(e) or type(e).__name__
    else:
        _lib = lib
    _loaded = True  # last: the unlocked check in load() must not see it before _lib is set


