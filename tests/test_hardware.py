"""The machine the trainer runs on: the CUDA backends' settings (TF32, SDPA's flash kernel), the GPU
peak table MFU divides by, and MFU itself. No GPU here: the CUDA branches are run on this CPU build
of torch, whose backend flags exist and can be read back."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_gpt
from simplegpt.accel import cpu
from simplegpt.config import TrainConfig
from simplegpt.data.prepare import prepare_corpus
from simplegpt.data.samplers import PackedSampler, PaddedSampler
from simplegpt.data.shards import TokenShards
from simplegpt.model import GPTConfig
from simplegpt.training import hardware
from simplegpt.training.hardware import (GPU_PEAKS, configure_backends, device_peak_flops, format_mfu,
                                         gpu_peak_flops, mfu)

# Names as torch.cuda.get_device_name reports them, and the table's entry each must get.
KNOWN = [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989e12),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", "H100 NVL", 835e12),
    ("NVIDIA H200", "H200 SXM", 989e12),
    ("NVIDIA H200 NVL", "H200 NVL", 835e12),
    ("NVIDIA GH200 480GB", "GH200", 989e12),
    ("NVIDIA A100-SXM4-80GB", "A100", 312e12),
    ("NVIDIA A100-SXM4-40GB", "A100", 312e12),
    ("NVIDIA A100-PCIE-40GB", "A100", 312e12),
    ("NVIDIA A100 80GB PCIe", "A100", 312e12),
    ("NVIDIA A30", "A30", 165e12),
    ("NVIDIA A10", "A10", 125e12),
    ("NVIDIA L4", "L4", 121e12),
    ("NVIDIA L40", "L40", 181e12),
    ("NVIDIA L40S", "L40S", 362e12),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 165e12),
    ("NVIDIA GeForce RTX 3090", "RTX 3090", 71e12),
    ("Tesla V100-SXM2-16GB", "V100 SXM", 125e12),
    ("Tesla V100-PCIE-32GB", "V100 PCIe", 112e12),
    ("Tesla V100S-PCIE-32GB", "V100S", 130e12),
    ("Tesla T4", "T4", 65e12),
]
# Names close to a table entry that are other devices (or a part of one): never taken for it.
UNKNOWN = ["NVIDIA A10G", "NVIDIA GeForce RTX 3090 Ti", "NVIDIA GeForce RTX 4090 Laptop GPU",
           "NVIDIA GeForce RTX 4090 D", "NVIDIA A100-SXM4-40GB MIG 3g.20gb", "NVIDIA B200",
           "AMD Instinct MI300X", "NVIDIA GeForce RTX 2080 Ti", "NVIDIA RTX A6000"]


@pytest.mark.parametrize("name,label,flops", KNOWN)
def test_a_known_gpu_gets_its_own_dense_bf16_peak(name, label, flops):
    assert gpu_peak_flops(name) == (label, flops)
    assert gpu_peak_flops(name.lower()) == (label, flops)  # case and spacing do not matter


@pytest.mark.parametrize("name", UNKNOWN)
def test_a_near_name_is_unknown_not_a_neighbour(name):
    assert gpu_peak_flops(name) is None


def test_every_table_entry_is_reachable():
    """Each entry is what some real name gets: none is shadowed by an earlier, more general one."""
    assert {label for _, label, _ in KNOWN} == {label for label, _, _ in GPU_PEAKS}


@pytest.fixture
def cuda_named(monkeypatch):
    """A CUDA device whose name torch reports as `name` (this machine has none)."""
    def use(name):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        return torch.device("cuda")
    return use


def test_the_trainer_s_peak_on_a_known_and_an_unknown_gpu(cuda_named):
    flops, basis = device_peak_flops(TrainConfig(), cuda_named("NVIDIA H100 PCIe"), 1)
    assert flops == 756e12 and basis == "the H100 PCIe's dense bf16 peak, 756 TFLOP/s"
    flops, basis = device_peak_flops(TrainConfig(), cuda_named("NVIDIA A10G"), 1)
    assert flops is None
    assert "NVIDIA A10G is not in" in basis and "MFU is not computed" in basis and "set peak_flops" in basis
    # the configured peak wins, known device or not
    assert device_peak_flops(TrainConfig(peak_flops=2e14), cuda_named("NVIDIA A10G"), 1)[0] == 2e14
    assert device_peak_flops(TrainConfig(peak_flops=2e14), cuda_named("NVIDIA H200"), 1)[0] == 2e14


def test_a_cpus_peak_is_timed_only_where_its_vector_peak_is_unknown(monkeypatch):
    """The CPU peak comes from the cores' vector width and clock where /proc/cpuinfo gives them, with
    no timed matmul (0.2 s of every run's start, which a time budget counts); a timed matmul only
    where that is unknown."""
    from simplegpt.training import hardware

    timed = []
    monkeypatch.setattr(hardware, "_matmul_rate", lambda: timed.append(1) or 5e10)
    monkeypatch.setattr(hardware, "cpu_vector_peak", lambda threads: (threads * 1e11, "AVX-512, test"))
    assert device_peak_flops(TrainConfig(), torch.device("cpu"), 2) == (
        2e11, "the float32 peak of 2 cores, 200 GFLOP/s (AVX-512, test)")
    assert timed == []
    monkeypatch.setattr(hardware, "cpu_vector_peak", lambda threads: None)
    flops, basis = device_peak_flops(TrainConfig(), torch.device("cpu"), 1)
    assert (flops, timed) == (5e10, [1]) and "a timed matmul" in basis


def test_an_unknown_gpu_is_no_longer_an_assumed_100_tflops(cuda_named):
    """An unknown GPU's peak is None, so the trainer's MFU is None in metrics.jsonl and "unknown" on screen."""
    flops, basis = device_peak_flops(TrainConfig(), cuda_named("NVIDIA A10G"), 1)
    assert flops is None and "MFU is not computed" in basis
    assert mfu(1e9, 1e5, flops) is None and format_mfu(None) == "unknown"


def test_mfu_is_flops_over_the_peak_and_never_above_one():
    model = make_tiny_gpt()
    per_token = model.flops_per_token(32)
    assert mfu(per_token, 1000.0, 1e12) == pytest.approx(per_token * 1000.0 / 1e12)
    assert mfu(per_token, 1e12, 1e12) == 1.0  # a peak set too low
    assert mfu(per_token, 1000.0, None) is None
    assert format_mfu(0.41256) == "41.3%"


def test_gpt2_124m_flops_per_token_is_palm_s_6n_plus_attention():
    """6N + 12·L·C·T (PaLM appendix B, nanoGPT's estimate_mfu) for GPT-2 124M at T = 1024, N the
    parameters without the position table (the tied token embedding is the head's matmul)."""
    from simplegpt.model import GPT

    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12))
    n = model.num_parameters(non_embedding=True)
    assert n == 124_439_808 - 1024 * 768  # GPT-2 small's 124.4M (tied head once) less the position table
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024


def _backend_state():
    return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision,
            torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled())


@pytest.fixture
def backends():
    """Backend flags set to what configure_backends must change, and put back afterwards (process-wide)."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.conv.fp32_precision,
             torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.conv.fp32_precision = saved[1]
    torch.backends.cuda.enable_flash_sdp(saved[2])
    torch.backends.cuda.enable_mem_efficient_sdp(saved[3])


def test_configure_backends_leaves_a_cpu_run_alone(backends):
    before = _backend_state()
    configure_backends(torch.device("cpu"))
    assert _backend_state() == before == ("highest", "ieee", "ieee", False, False)


def test_configure_backends_turns_on_tf32_and_flash_attention_on_cuda(backends):
    configure_backends(torch.device("cuda"))
    configure_backends(torch.device("cuda", 0))  # twice, and with an index: the same settings, no error
    assert _backend_state() == ("high", "tf32", "tf32", True, True)
    # both the legacy and the per-backend reading agree, so torch.compile's autotuning can read it
    assert torch.backends.cuda.matmul.allow_tf32


def _sdpa_calls(monkeypatch):
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append({"mask": attn_mask is not None, "is_causal": is_causal, "dtype": q.dtype, "D": q.size(-1)})
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def test_the_training_step_on_packed_batches_is_flash_attention_s_call(monkeypatch, tmp_path):
    """What a CUDA run's step calls (the plain model: the CPU kernels never apply there), under bf16
    autocast: is_causal without a mask, bf16 q/k/v, a head size flash takes. Padded batches need a mask."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 40)
    meta = prepare_corpus(str(corpus), tmp_path / "data", "char", progress=False)
    model = make_tiny_gpt(vocab_size=meta["vocab_size"], n_embd=64, n_head=4)  # head size 16
    calls = _sdpa_calls(monkeypatch)
    batch = PackedSampler(TokenShards(tmp_path / "data", "train"), block_size=32, batch_size=4, seed=0).next_batch()
    assert len(batch) == 2  # packed batches carry no attention mask
    with cpu.disabled(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.loss(*batch).backward()
    assert calls and all(c == {"mask": False, "is_causal": True, "dtype": torch.bfloat16, "D": 16} for c in calls)
    assert GPTConfig(n_embd=768, n_head=12).head_dim == 64  # GPT-2 124M's heads: flash takes multiples of 8 to 256

    calls.clear()
    docs = [np.arange(1, 10) % meta["vocab_size"], np.arange(3, 30) % meta["vocab_size"]]
    x, y, mask = PaddedSampler(docs, block_size=32, batch_size=2, pad_id=0, seed=0).next_batch()
    with cpu.disabled():
        model.loss(x, y, attention_mask=mask)
    assert calls and all(c["mask"] for c in calls)


def test_the_peak_table_is_the_one_the_trainer_reads():
    assert hardware.GPU_PEAK_FLOPS == {label: flops for label, _, flops in GPU_PEAKS}
