"""Loading the CPU kernels (csrc/*.c), picking the build for the CPU, and the switches.

The library is compiled on first use with the machine's C compiler ($CC, else cc) into the cache
folder, and loaded with ctypes: no build step at install. There is one build per variant (VARIANTS),
each from the same sources with its own flags, never -march=native: a cached library runs on any CPU
with its variant's features. Once per process, `load()` takes the first variant in VARIANTS' order
whose features the CPU reports (/proc/cpuinfo) and whose flags the compiler takes;
SIMPLEGPT_CPU_KERNELS=avx512|avx2|portable forces one (an OptionError if it cannot run here). Where no
variant fits (no compiler, a CPU without AVX2, not x86-64 unless forced to `portable`), with
SIMPLEGPT_NATIVE=0 in the environment, or inside a `disabled()` block, `load()` returns None,
`unavailable_reason()` says why, and every caller keeps PyTorch's kernels. `report()` says which
build is in use and why (`python -m simplegpt.accel.cpu`, `simplegpt info --system`).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ...errors import OptionError
from ...files import cache_dir
from .slots import BLOCK_SLOTS

HERE = Path(__file__).parent / "csrc"
# one family of ops a file (each op written once, used by decoding and training alike), then the
# block and the whole model composed of them
SOURCES = [HERE / f"{name}.c" for name in ("pool", "gemv", "layernorm", "rmsnorm", "rope", "gelu", "activation",
                                           "attention", "attention_decode", "matmul", "adamw", "block", "llama_decode",
                                           "model", "llama_model")]
HEADERS = [HERE / f"{name}.h" for name in ("api", "kernels", "simd", "simd_portable", "slots", "llama")]
# only api.h's functions are exported (SG_API); the rest can be inlined across the files' own calls
FLAGS = ["-O3", "-fno-math-errno", "-shared", "-fPIC", "-pthread", "-fvisibility=hidden"]


@dataclass(frozen=True)
class Variant:
    """One build of the library: the compiler flags that select its code paths (csrc/simd.h) and
    the /proc/cpuinfo flags a CPU must report to run it."""

    name: str
    flags: tuple[str, ...]
    cpu_flags: tuple[str, ...]


# In order of preference. avx512 needs VNNI (vpdpbusd, the int8 kernel) besides F/BW/VL; it uses no
# BF16 instruction, so it does not ask for AVX-512 BF16 (Ice Lake servers have VNNI without it).
# The avx2 build is compiled without any AVX-512 flag, so it holds no AVX-512 instruction (AMD Zen
# 3). portable: no intrinsics (csrc/simd_portable.h), for other CPUs; never picked on its own.
VARIANTS = (
    Variant("avx512", ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
            ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")),
    Variant("avx2", ("-mavx2", "-mfma"), ("avx2", "fma")),
    Variant("portable", (), ()),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
# The training kernels' loops use OpenMP; linked against libgomp they share torch's threads (see
# csrc/pool.c). Where the compiler has no OpenMP they run on the calling thread.
OPENMP = ["-fopenmp"]

_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
# Every function of csrc/api.h: name -> (result, arguments) as ctypes types (pointers are c_void_p;
# tests/test_native_layout.py checks this table against api.h's declarations).
SIGNATURES: dict[str, tuple[type | None, list[type]]] = {
    "sg_init": (_I, [_I]),
    "sg_omp_threads": (_I, []),
    "sg_variant": (ctypes.c_char_p, []),
    "sg_max_rows": (_I, []),
    "sg_gemv": (None, [_P] * 4 + [_I] * 4),
    "sg_gemv_q8": (None, [_P] * 5 + [_I] * 4),
    "sg_layernorm_fwd": (None, [_P] * 6 + [_L, _I, _F]),
    "sg_layernorm_bwd": (_I, [_P] * 9 + [_L, _I]),
    "sg_rmsnorm_fwd": (None, [_P] * 4 + [_L, _I, _F]),
    "sg_rmsnorm_bwd": (_I, [_P] * 6 + [_L, _I]),
    "sg_rmsnorm_fwd_ld": (None, [_P, _L, _P, _P, _L, _P, _L, _I, _I, _F]),
    "sg_rmsnorm_bwd_ld": (_I, [_P, _L, _P, _P, _P, _L, _P, _L, _P, _L, _I, _I]),
    "sg_rope_fwd": (None, [_P] * 4 + [_L, _P] + [_I] * 5),
    "sg_rope": (None, [_P] * 4 + [_L, _P, _P] + [_I] * 5),
    "sg_gelu_fwd": (None, [_P] * 2 + [_L]),
    "sg_gelu_bwd": (None, [_P] * 3 + [_L]),
    "sg_attn_fwd": (_I, [_P] * 3 + [_I] * 4 + [_F]),
    "sg_attn_bwd": (_I, [_P] * 5 + [_I] * 4 + [_F]),
    "sg_swiglu_fwd": (None, [_P] * 3 + [_L, _I, _L, _L]),
    "sg_swiglu_bwd": (None, [_P] * 5 + [_L, _I, _L, _L]),
    "sg_swiglu_bwd_ld": (None, [_P] * 5 + [_L, _I, _L, _L, _L]),
    "sg_relu2_fwd": (None, [_P] * 2 + [_L]),
    "sg_relu2_bwd": (None, [_P] * 3 + [_L]),
    "sg_attn_gqa_fwd": (_I, [_P] * 6 + [_I] * 5 + [_F]),
    "sg_attn_gqa_bwd": (_I, [_P] * 10 + [_I] * 5 + [_F]),
    "sg_attn_decode": (_I, [_P] * 5 + [_L] + [_I] * 5 + [_L] * 3 + [_F, _I]),
    "sg_set_sgemm": (None, [_P]),
    "sg_block_slot": (ctypes.c_char_p, [_I]),
    "sg_block1_scratch": (_L, [_I] * 4),
    "sg_blocks1": (_I, [_P] * 5 + [_L] * 2 + [_I] * 2 + [_P, _L] + [_I] * 3 + [_F, _P, _I]),
    "sg_llama_slots": (_I, []),
    "sg_llama_block1_scratch": (_L, [_I, _P, _I, _I]),
    "sg_llama_blocks1": (_I, [_P] * 5 + [_L] * 2 + [_I] * 2 + [_P] * 2 + [_L, _P, _I, _P] + [_F] * 2 + [_P, _I]),
    "sg_block_saved_floats": (_L, [_I] * 5),
    "sg_block_fwd": (_I, [_P] * 4 + [_I] * 5 + [_F] * 2),
    "sg_block_bwd": (_I, [_P] * 6 + [_I] * 5),
    "sg_gpt_head_floats": (_L, [_I] * 4),
    "sg_gpt_fwd": (_I, [_P] * 2 + [_I] * 7 + [_F] + [_P] * 4),
    "sg_gpt_bwd": (_I, [_P] * 2 + [_I] * 7 + [_F] + [_P] * 3 + [_I]),
    "sg_llama_saved_floats": (_L, [_I, _I, _P, _I]),
    "sg_llama_fwd": (_I, [_P] * 2 + [_I] * 4 + [_P] * 3 + [_F] * 2 + [_P] * 4),
    "sg_llama_bwd": (_I, [_P] * 2 + [_I] * 4 + [_P] * 3 + [_F] + [_P] * 3 + [_I]),
    "sg_sqnorm": (_I, [_P] * 2 + [_I] * 2 + [_P]),
    "sg_adamw": (_I, [_P] * 6 + [_I, _F, _I]),
}

MAX_ROWS = 16  # rows up to which the gemv kernel beats PyTorch's BLAS (docs/benchmarks.md)
MAX_INT8_IN = 2**16  # the kernel's buffer for a quantized input row

_lib: ctypes.CDLL | None = None
_reason: str | None = None
_variant: Variant | None = None
_why: list[str] = []  # how the variant was chosen: report()'s lines
_loaded = False
_load_lock = threading.Lock()
_disabled = 0  # depth of disabled() blocks


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


def _compile(cc: str, variant: Variant, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        for extra in (OPENMP, []):
            out = subprocess.run([cc, *FLAGS, *variant.flags, *extra, "-o", tmp, *map(str, SOURCES), "-lm"],
                                 capture_output=True, text=True, timeout=120)
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


def _cpuinfo(*keys: str) -> str | None:
    """The value of the first of keys in /proc/cpuinfo (its first processor), None without it."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.split(":")[0].strip() in keys:
            return line.split(":", 1)[1].strip()
    return None


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux reports them (/proc/cpuinfo), None where it does not."""
    flags = _cpuinfo("flags", "Features")  # x86's name, then aarch64's
    return None if flags is None else set(flags.split())


def _features() -> tuple[set[str], str]:
    """The CPU's flags and where they came from; without /proc/cpuinfo only AVX2 and FMA can be told
    (from torch's own CPU check), so such a machine gets the avx2 build at most."""
    flags = cpu_flags()
    if flags is not None:
        return flags, "/proc/cpuinfo"
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return {"avx2", "fma"}, "torch.backends.cpu.get_cpu_capability()"
    return set(), "torch.backends.cpu.get_cpu_capability()"


def forced_variant() -> Variant | None:
    """The variant SIMPLEGPT_CPU_KERNELS names (None when unset); OptionError for another value."""
    name = os.environ.get("SIMPLEGPT_CPU_KERNELS", "").strip().lower()
    if not name:
        return None
    for v in VARIANTS:
        if v.name == name:
            return v
    raise OptionError(f"SIMPLEGPT_CPU_KERNELS={name!r}: expected one of {', '.join(VARIANT_NAMES)}")


def missing_features(variant: Variant) -> list[str]:
    """The CPU flags `variant` needs that this CPU does not report (empty: it can run here)."""
    flags, _ = _features()
    return [f for f in variant.cpu_flags if f not in flags]


def build(name: str) -> ctypes.CDLL:
    """The library of the variant called `name`, built if needed, whatever load() chose: for tests
    that run every variant the CPU can, and benchmarks that compare them. OptionError where this CPU
    cannot run it; RuntimeError or OSError where it does not build."""
    [variant] = [v for v in VARIANTS if v.name == name] or [None]
    if variant is None:
        raise OptionError(f"no kernel variant {name!r}: expected one of {', '.join(VARIANT_NAMES)}")
    missing = missing_features(variant)
    if missing:
        raise OptionError(f"the {name} kernels cannot run here: this CPU lacks {', '.join(missing)}")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (set CC)")
    return _build(cc, variant)


def _build(cc: str, variant: Variant) -> ctypes.CDLL:
    code = b"".join(f.read_bytes() for f in [*SOURCES, *HEADERS])
    key = hashlib.sha256(code + " ".join([cc, variant.name, *FLAGS, *variant.flags, *OPENMP]).encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"kernels-{variant.name}-{key}.so"
    if not target.is_file():
        _compile(cc, variant, target)
    lib = ctypes.CDLL(str(target))
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    if lib.sg_variant() != variant.name.encode():
        raise RuntimeError(f"the {variant.name} build's code paths are {lib.sg_variant().decode()}'s (check its flags)")
    if lib.sg_max_rows() != MAX_ROWS:
        raise RuntimeError(f"the library's MAX_ROWS is {lib.sg_max_rows()}, not {MAX_ROWS}")
    slots = [lib.sg_block_slot(i) for i in range(len(BLOCK_SLOTS) + 1)]
    if slots != [f"{mod}.{name}".encode() for mod, name in BLOCK_SLOTS] + [None]:
        raise RuntimeError(f"the library's block slots {slots[:-1]} are not slots.py's {BLOCK_SLOTS}")
    return lib


def _load() -> None:
    global _lib, _reason, _loaded, _variant
    errors = (OSError, AttributeError, RuntimeError, subprocess.SubprocessError)  # AttributeError: a stale library
    _why.clear()
    try:
        if os.environ.get("SIMPLEGPT_NATIVE", "1") == "0":
            raise RuntimeError("SIMPLEGPT_NATIVE=0")
        forced = forced_variant()  # an OptionError leaves the library unloaded: every load() raises it
        where = f"{sys.platform}/{platform.machine()}"
        if sys.platform == "win32":
            raise RuntimeError(f"no kernel for {where}")
        if platform.machine().lower() not in ("x86_64", "amd64") and not forced:
            raise RuntimeError(f"no kernel for {where} by default (SIMPLEGPT_CPU_KERNELS=portable builds the "
                               "portable one, whose speed there is not measured)")
        flags, source = _features()
        if forced:
            missing = [f for f in forced.cpu_flags if f not in flags]
            if missing:
                raise OptionError(f"SIMPLEGPT_CPU_KERNELS={forced.name}: this CPU lacks {', '.join(missing)} "
                                  f"(per {source})")
            candidates = [forced]
            _why.append(f"{forced.name}: forced by SIMPLEGPT_CPU_KERNELS")
        else:
            candidates = []
            for v in VARIANTS[:-1]:  # portable only when forced (its speed is not measured anywhere)
                missing = [f for f in v.cpu_flags if f not in flags]
                if missing:
                    _why.append(f"{v.name}: not used, the CPU lacks {', '.join(missing)} (per {source})")
                else:
                    candidates.append(v)
            if not candidates:
                raise RuntimeError("the CPU has no AVX2 and FMA")
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            raise RuntimeError("no C compiler (set CC)")
        for v in candidates:
            try:
                lib = _build(cc, v)
            except errors as e:
                _why.append(f"{v.name}: not used, {e or type(e).__name__}")
                if forced:
                    raise OptionError(f"SIMPLEGPT_CPU_KERNELS={v.name}: {e or type(e).__name__}") from e
                continue
            if not forced:
                _why.append(f"{v.name}: in use, the CPU has {', '.join(v.cpu_flags)} and {cc} builds it")
            _lib, _variant = lib, v
            break
        else:
            raise RuntimeError("; ".join(_why))
    except errors as e:
        _reason = str(e) or type(e).__name__
    _loaded = True  # last: the unlocked check in load() must not see it before _lib is set


def variant() -> str | None:
    """The name of the build in use (a VARIANTS name), None where the kernels are not in use."""
    return _variant.name if load() is not None else None


def report() -> str:
    """Which kernels this process uses and why, a few lines for a person (loads the library)."""
    lib = load()
    flags, source = _features()
    wanted = sorted({f for v in VARIANTS for f in v.cpu_flags} | {"avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"})
    lines = [f"CPU: {_cpuinfo('model name') or platform.processor() or platform.machine()}; features (per {source}): "
             + (" ".join(f for f in wanted if f in flags) or "none of " + " ".join(wanted))]
    if lib is None:
        lines.append(f"CPU kernels: not in use ({unavailable_reason()}); PyTorch's kernels run everything")
    else:
        lines.append(f"CPU kernels: {_variant.name} build ({' '.join(_variant.flags) or 'no ISA flags'})")
    lines += [f"  {line}" for line in _why]
    if flags & {"avx512_bf16", "amx_tile"}:
        lines.append("  (AVX-512 BF16 and AMX are listed for information: these kernels use neither)")
    lines.append(f"PyTorch's own kernels: {torch.backends.cpu.get_cpu_capability()}")
    return "\n".join(lines)
