"""An in-place weight layout for models the engine owns (Engine.from_checkpoint), never for one it was handed."""

from __future__ import annotations

import torch.nn as nn


def use_gemv_layout(model: nn.Module) -> None:
    """Store every Linear weight (and the tied output head) column-major, in place.

    Values, names and the state_dict are unchanged; only the memory layout differs. At batch 1
    each decode step is a matrix-vector product per layer, and on CPUs the BLAS kernel for
    x @ W with W stored (in, out) row by row streams memory faster than the one for the
    (out, in) layout (at GPT-2 124M on a 2-core CPU: blocks 11 -> 14 GB/s, head 11 -> 22 GB/s;
    docs/benchmarks.md). Training on such weights works as before. Engine.from_checkpoint applies it
    on the CPU where the native kernels are unavailable.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            w = module.weight
            if w.dim() == 2 and w.is_contiguous() and w.size(0) > 1 and w.size(1) > 1:
                w.data = w.data.t().contiguous().t()
