"""int8 weights for inference: 4x smaller linear layers and faster memory-bound decoding.

Every nn.Linear of the transformer blocks and the output head gets int8 weights with one
fp32 scale per output channel (symmetric, scale = max|w| / 127). The matrix product runs in
PyTorch's fbgemm/x86 int8 kernels, which also quantize each activation row to 8 bits on the
fly (like llama.cpp's q8_0 dot products): on CPUs this is ~10x faster at batch 1 than
torch's weight-only int8 kernel and needs no compilation. Embeddings stay fp32.
Quantized models are for inference only: the output head is no longer tied, and the model
cannot be trained or saved as a checkpoint.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from .accel import cpu
from .model import GPT

QUANT_MODES = ("none", "int8")


def _cpu_has_vnni() -> bool:
    """True when the CPU has VNNI int8 dot products (Linux: read from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "vnni" in line  # avx512_vnni or avx_vnni
    except OSError:
        pass
    return False


# Full 8-bit activations are exact only with VNNI; the AVX2 kernel (vpmaddubsw) saturates int16
# sums of two products, so without VNNI activations are quantized to 7 bits, as fbgemm advises.
_REDUCE_RANGE = not _cpu_has_vnni()


class Int8Linear(nn.Module):
    """A Linear layer with per-output-channel int8 weights (packed for the int8 GEMM)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float().cpu()  # (out, in)
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        zero_points = torch.zeros(w.size(0), dtype=torch.long)
        with warnings.catch_warnings():
            # The qint8 tensor type is deprecated, but it is still the input fbgemm's prepack takes.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(w, scales, zero_points, axis=0, dtype=torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_bytes = w.numel() + scales.numel() * 4 + (0 if bias is None else bias.numel() * 4)
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        # Where the CPU kernels are enabled, the same int8 weights (N, K), fp32 row scales (N,) and
        # bias as plain tensors beside fbgemm's packed copy: the engine's native backend runs its
        # calls of up to MAX_ROWS rows (decode steps, short prefills) on them.
        self.qweight = self.scale = self.bias = None
        if cpu.enabled() and self.in_features <= cpu.MAX_INT8_IN:
            self.qweight = qweight.int_repr().contiguous()
            self.scale = scales.float()
            self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, _REDUCE_RANGE)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


@dataclass
class QuantReport:
    """Bytes of the weights read per token before and after quantization."""

    fp32_bytes: int
    int8_bytes: int
    layers: int

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / max(self.int8_bytes, 1)


def quantize_int8(model: GPT) -> QuantReport:
    """Replace the model's Linear layers (blocks and output head) by Int8Linear, in place. CPU only."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("int8 quantization runs on the CPU only: use --device cpu (or drop --quantize on a GPU)")
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm")):
        raise ValueError(f"this PyTorch build has no x86 int8 kernels (quantized engines: {engines})")
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        torch.backends.quantized.engine = "x86" if "x86" in engines else "fbgemm"
    model.eval()
    fp32 = int8 = n = 0
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for name, linear in targets:
        q = Int8Linear(linear)
        fp32 += linear.weight.numel() * 4 + (0 if linear.bias is None else linear.bias.numel() * 4)
        int8 += q.weight_bytes
        n += 1
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, q)
    return QuantReport(fp32_bytes=fp32, int8_bytes=int8, layers=n)
