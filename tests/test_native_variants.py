"""Every build of the CPU kernels (simplegpt.accel.cpu.lib.VARIANTS) against PyTorch in float64, on
the CPU at hand: the other test files run the build load() picks (avx512 on an AVX-512 VNNI host);
here each variant's library is swapped in turn into the same process and runs a few cases of those
files' own checks, so the AVX2 path is tested on AVX-512 hosts too, and the portable path (ARM's)
on x86. A variant this CPU cannot run is skipped with the features it lacks. Also the switch that
forces a variant, and the report of which one is in use."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import test_native as decoding
import test_native_optimizer as optimizer
import test_native_training as train
from conftest import use_kernel_variant
from simplegpt.accel.cpu import decode, lib
from simplegpt.errors import OptionError

if lib.load() is None and os.environ.get("CI"):
    raise RuntimeError(f"the CPU kernels must build in CI: {lib.unavailable_reason()}")


@pytest.fixture(params=lib.VARIANT_NAMES)
def variant(request, monkeypatch):
    """The variant's library in place of the one load() chose, for this test only."""
    return use_kernel_variant(request.param, monkeypatch)


def each(fn, *args):
    """fn(*args, monkeypatch) with a monkeypatch of its own, undone when it returns."""
    with pytest.MonkeyPatch.context() as mp:
        fn(*args, mp)


def test_decoding_products_equal_float64(variant):
    for (N, K) in [(7, 13), (96, 32), (3001, 771)]:  # tails of every vector width; 4-row groups and the rest
        for rows in [(1, 1), (4, 4)]:
            for threads in [1, 3]:
                each(decoding.test_kernel_equals_f_linear, N, K, threads, rows)
    for (N, K) in [(7, 13), (771, 776)]:
        each(decoding.test_rows_of_a_batch_equal_each_row_alone, N, K, 3)
    for (N, K) in [(5, 40), (1001, 77), (131, 3072)]:
        for M in [1, 3, 16]:
            each(decoding.test_int8_kernel_is_the_integer_dot_product_of_rounded_inputs, N, K, 3, M)


@pytest.mark.skipif(lib.load() is None, reason=f"CPU kernels unavailable: {lib.unavailable_reason()}")
def test_int8_products_are_the_same_numbers_on_every_variant(monkeypatch):
    """The int8 kernel's paths (VNNI, AVX2's maddubs, plain C) round x alike (ties to even) and
    compute the same integer dot products, so every variant this CPU runs gives the same floats, bit
    for bit: shapes with and without a K % 64 tail, 4-row groups and single rows, 1 to 16 rows of
    x, inputs on rounding ties, a NaN and a row of zeros."""
    import torch

    torch.manual_seed(0)
    cases = []
    for N, K in [(9, 40), (64, 64), (131, 200), (1001, 576), (37, 3072)]:
        for M in [1, 2, 5, 16]:
            x = torch.randn(M, K) * torch.rand(M, 1) * 4
            x[0, 0] = 127.0  # x[0] rounds with scale 1: its halves are ties
            x[0, 1:9] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5])[: K - 1]
            if M > 1:
                x[1, K - 1] = float("nan")  # passed over by max |x|, and rounded to 0
            if M > 2:
                x[2] = 0.0
            w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
            cases.append((x, w, torch.rand(N) / 127, torch.randn(N)))
    results = {}
    for name in lib.VARIANT_NAMES:
        with pytest.MonkeyPatch.context() as mp:
            try:
                use_kernel_variant(name, mp)
            except pytest.skip.Exception:
                continue
            mp.setattr(decode, "_threads", 3)
            results[name] = [decode.linear_int8(x, w, s, b) for x, w, s, b in cases]
    assert len(results) >= 2, "this CPU runs only one variant"
    first, *others = results
    for name in others:
        for got, want in zip(results[name], results[first]):
            # the portable build's compiler may not fuse the scaling's multiply-add (no -mfma): a last bit
            exact = "portable" not in (name, first)
            assert torch.equal(got, want) if exact else torch.allclose(got, want, rtol=1e-6, atol=1e-6), \
                f"{name} differs from {first}"


def test_decode_steps_equal_the_model(variant):
    each(decoding.test_block_kernel_on_odd_shapes_equals_the_model, True)
    each(decoding.test_int8_model_decodes_through_the_block_kernel)


def test_training_kernels_equal_float64(variant):
    for n in [13, 4096 * 3 + 5]:
        train.test_gelu_forward_and_backward_equal_float64(n)
    for shape in [(2, 13, 64, 2), (3, 37, 96, 3), (5, 9, 128, 16)]:
        train.test_attention_forward_and_backward_equal_float64(*shape)
    for shape in [(37, 13, False), (100, 771, True)]:
        train.test_layer_norm_forward_and_backward_equal_float64(*shape)
    each(train.test_training_step_takes_the_kernels_and_matches_pytorch, True, True)
    optimizer.test_step_equals_clip_grad_norm_and_torch_adamw(False, 1.0)


@pytest.fixture
def fresh_load(monkeypatch):
    """load() as in a new process (its state restored afterwards), under the environment the test sets."""
    monkeypatch.delenv("SIMPLEGPT_NATIVE", raising=False)
    monkeypatch.delenv("SIMPLEGPT_CPU_KERNELS", raising=False)

    def load(**env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        for name, value in [("_loaded", False), ("_lib", None), ("_variant", None), ("_reason", None), ("_why", [])]:
            monkeypatch.setattr(lib, name, value)
        monkeypatch.setattr(decode, "_pool", 0)
        return lib.load()

    return load


@pytest.mark.skipif(lib.load() is None, reason=f"CPU kernels unavailable: {lib.unavailable_reason()}")
def test_the_switch_forces_a_variant_and_the_report_says_why(fresh_load):
    assert fresh_load() is not None
    picked = lib.variant()
    assert picked in ("avx512", "avx2") and f"{picked}: in use" in lib.report()
    # the first variant whose features the CPU has
    assert [v.name for v in lib.VARIANTS if not lib.missing_features(v)][0] == picked
    assert fresh_load(SIMPLEGPT_CPU_KERNELS="avx2").sg_variant() == b"avx2" and lib.variant() == "avx2"
    assert "avx2: forced by SIMPLEGPT_CPU_KERNELS" in lib.report()
    with pytest.raises(OptionError, match="SIMPLEGPT_CPU_KERNELS='sse': expected one of avx512, avx2, portable"):
        fresh_load(SIMPLEGPT_CPU_KERNELS="sse")
    assert fresh_load(SIMPLEGPT_CPU_KERNELS="avx2", SIMPLEGPT_NATIVE="0") is None  # off wins
    assert lib.variant() is None and "SIMPLEGPT_NATIVE=0" in lib.report()


def test_a_forced_variant_the_cpu_cannot_run_is_one_clear_error(fresh_load, monkeypatch):
    """A CPU without AVX-512 VNNI (faked: a CPU reporting only AVX2 and FMA) refuses the forced
    avx512 build with the features it lacks, in every load()."""
    builds = lib.load() is not None and not lib.missing_features(lib.VARIANTS[1])  # the avx2 build, here
    monkeypatch.setattr(lib, "_features", lambda: ({"avx2", "fma"}, "a test"))
    for _ in range(2):
        with pytest.raises(OptionError) as e:
            fresh_load(SIMPLEGPT_CPU_KERNELS="avx512")
        assert str(e.value) == ("SIMPLEGPT_CPU_KERNELS=avx512: this CPU lacks avx512f, avx512bw, avx512vl, "
                                "avx512_vnni (per a test)")
    with pytest.raises(OptionError, match="the avx512 kernels cannot run here: this CPU lacks avx512f"):
        lib.build("avx512")
    # unforced, the same CPU gets the avx2 build, and the report says why not avx512
    if builds:
        monkeypatch.delenv("SIMPLEGPT_CPU_KERNELS")
        assert fresh_load() is not None and lib.variant() == "avx2"
        assert "avx512: not used, the CPU lacks avx512f, avx512bw, avx512vl, avx512_vnni (per a test)" in lib.report()


@pytest.mark.skipif(not shutil.which("objdump") or lib.missing_features(lib.VARIANTS[1]) != [],
                    reason="needs objdump and a CPU that runs the avx2 build")
def test_the_avx2_build_holds_no_avx512_instruction():
    """The avx2 build must run on CPUs without AVX-512 (AMD Zen 3): no zmm or mask register, no
    EVEX-only register (xmm/ymm 16-31), while the avx512 build has them."""
    evex = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b")
    def disassembly(name):
        so = lib.build(name)._name
        return subprocess.run(["objdump", "-d", "--no-show-raw-insn", so], capture_output=True, text=True,
                              check=True).stdout
    assert not evex.findall(disassembly("avx2"))
    if not lib.missing_features(lib.VARIANTS[0]):
        assert evex.search(disassembly("avx512"))


AARCH64_GCC, QEMU, SYSROOT = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64"), "/usr/aarch64-linux-gnu"


@pytest.mark.skipif(not AARCH64_GCC, reason="no aarch64 cross compiler (Debian: gcc-aarch64-linux-gnu; CI installs it)")
def test_the_portable_build_compiles_and_computes_on_aarch64(tmp_path):
    """The C sources hold no x86 intrinsic outside the x86 variants' paths: the portable variant
    builds for aarch64 with lib.py's own compile step (its flags, OpenMP and all). Under qemu-user
    (Debian: qemu-user) tests/native/check_kernels.c then checks that library's products,
    LayerNorm, GELU and attention against double-precision references (torch cannot run there)."""
    target = tmp_path / "kernels-aarch64.so"
    lib._compile(AARCH64_GCC, lib.VARIANTS[-1], target)
    assert target.read_bytes()[:4] == b"\x7fELF" and target.read_bytes()[18] == 183  # e_machine: EM_AARCH64
    if not (QEMU and os.path.isdir(SYSROOT)):
        pytest.skip("built; no qemu-aarch64 to run it (Debian: qemu-user; CI installs it)")
    check = tmp_path / "check_kernels"
    subprocess.run([AARCH64_GCC, "-O2", "-o", str(check), str(Path(__file__).parent / "native" / "check_kernels.c"),
                    str(target), f"-Wl,-rpath,{tmp_path}", "-lm"], check=True, capture_output=True)
    out = subprocess.run([QEMU, "-L", SYSROOT, str(check)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok (portable)", out.stdout + out.stderr


def test_info_system_prints_the_kernels_in_use_and_why(capsys):
    from simplegpt.cli import main

    assert main(["info", "--system"]) == 0
    out = capsys.readouterr().out
    assert "features (per " in out and "PyTorch's own kernels:" in out
    if lib.load() is not None:
        assert f"CPU kernels: {lib.variant()} build" in out and f"{lib.variant()}: in use" in out
    else:
        assert f"CPU kernels: not in use ({lib.unavailable_reason()})" in out
    with pytest.raises(SystemExit) as e:
        main(["info"])
    assert e.value.code == 2
    assert "required: CHECKPOINT (or --checkpoint CHECKPOINT) or --system" in capsys.readouterr().err
