"""AdamW with gradient clipping in the CPU kernels: torch.optim.AdamW whose step runs in csrc/adamw.c
where it applies (fp32 CPU tensors, the library loaded) and is PyTorch's own everywhere else.

    optimizer = cpu.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), fused=True)
    loss.backward()
    grad_norm = optimizer.clip_and_step(1.0)   # clip_grad_norm_(params, 1.0), then step()

The state (step, exp_avg, exp_avg_sq) and state_dict are PyTorch's own: a checkpoint loads into
torch.optim.AdamW and back. The kernels run on torch.get_num_threads() threads, so a caller that
sets one thread (a step split over cores) gets one.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import training


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW (same arguments, state and state_dict) whose update, with clipping in
    clip_and_step, takes two passes of csrc/adamw.c over all tensors where training.adamw_step applies."""

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW update (PyTorch's, with a closure or where the kernels do not apply)."""
        if closure is None and training.adamw_step(self, 0.0, torch.get_num_threads()) is not None:
            return None
        return super().step(closure)

    def clip_and_step(self, max_norm: float) -> float:
        """torch.nn.utils.clip_grad_norm_ over the parameters with gradients (when max_norm > 0), then
        step(). Returns the gradients' total norm before clipping (NaN when max_norm <= 0). A non-finite
        norm is returned without a step: clipping by it would turn every weight into NaN."""
        norm = training.adamw_step(self, max_norm, torch.get_num_threads())
        if norm is not None:
            return norm
        norm = math.nan
        if max_norm > 0:
            params = [p for group in self.param_groups for p in group["params"]]
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if not math.isfinite(norm):
                return norm
        super().step()
        return norm
