"""int8 weights for inference: 4x smaller linear layers and faster memory-bound decoding.

Every nn.Linear of the transformer blocks and the output head gets int8 weights with one
fp32 scale per output channel (symmetric, scale = max|w| / 127). Each activation row is rounded
to 8 bits with its own scale (max|x| of the row / 127, like llama.cpp's q8_0 dot products), so
a row's output depends on that row alone, never on the other rows of a batch. The matrix product
runs in PyTorch's fbgemm/x86 int8 GEMM: on CPUs this is ~10x faster at batch 1 than torch's
weight-only int8 kernel and needs no compilation. Embeddings stay fp32.
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
# fbgemm's int8 linear rounds its whole input to uint8 with one scale and zero point. Int8Linear
# divides each row by its max |x| (every row then lies in [-1, 1]) and gives fbgemm a fixed scale
# 1/(L-1) and zero point L: each row is rounded on the grid of its own scale max|x| / (L-1),
# symmetric with L-1 steps each way (L = 128: the native kernel's 8 bits; 64, 7 bits, without VNNI),
# and multiplying the output row by its max |x| undoes the division.
_LEVELS = 64 if _REDUCE_RANGE else 128
_TINY = torch.finfo(torch.float32).tiny


class Int8Linear(nn.Module):
    """A Linear layer with per-output-channel int8 weights (packed for the int8 GEMM) that rounds
    each input row to int8 with its own scale (see the module docstring): forward(x (..., in_features)
    fp32) -> (..., out_features) fp32."""

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
        # the bias is added after the rows are scaled back (see forward)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.bias = bias
        # Where the CPU kernels are enabled, the same int8 weights (N, K) and fp32 row scales (N,) as
        # plain tensors beside fbgemm's packed copy: the engine's native backend runs its decode
        # steps on them.
        self.qweight = self.scale = None
        if cpu.enabled() and self.in_features <= cpu.MAX_INT8_IN:
            self.qweight = qweight.int_repr().contiguous()
            self.scale = scales.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        # each row's max |x|; a row of zeros stays zeros (0 / tiny), and its output is the bias. The
        # same floats as vector_norm(rows, inf), which takes 6-10x longer (~40 us a call of 16 rows:
        # ~5 ms of a SmolLM2-135M 16-token prefill)
        amax = rows.abs().amax(dim=1, keepdim=True).clamp_(min=_TINY)  # (M, 1)
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(  # (M, N); see _LEVELS
            rows / amax, 1.0 / (_LEVELS - 1), _LEVELS, self._packed)
        y = y.mul_(amax) if self.bias is None else torch.addcmul(self.bias, y, amax)
        return y.view(*x.shape[:-1], self.out_features)

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
