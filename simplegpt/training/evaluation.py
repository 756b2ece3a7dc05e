"""What a run measures and shows at each evaluation: the val loss over a fixed set of batches, and
a sample for people to read."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

from ..model import GPT
from ..tokenizer import Tokenizer
from .loss import CrossEntropy

if TYPE_CHECKING:
    from .ways.base import Compute


def evaluate(model: nn.Module, make_sampler: Callable[[], Any], iters: int, device: torch.device,
             autocast: Any = None) -> float:
    """The val loss over the same `iters` batches every time: the mean over all their loss tokens (in
    padded batches a long row weighs as its tokens, not as one row). The model is left in train mode."""
    from .ways.base import Compute

    compute = Compute(device, torch.float32, autocast or contextlib.nullcontext(),
                      torch.amp.GradScaler(device.type, enabled=False), CrossEntropy())
    loss_sum, tokens = eval_sum(model, make_sampler, iters, compute)
    return loss_sum / tokens


@torch.no_grad()
def eval_sum(model: nn.Module, make_sampler: Callable[[], Any], iters: int, compute: "Compute",
             rank: int = 0, world: int = 1, same_count: bool = False) -> tuple[float, int]:
    """The summed per-token val losses of batches rank, rank + world, ... of the `iters` batches of the
    (always identical) validation sequence, and their number of loss tokens; summed over the ranks they
    are the single process's. same_count: every rank runs as many forward passes (a sharded model's
    forward is a collective), the ranks short of one run their last batch again, uncounted."""
    model.eval()
    sampler = make_sampler()
    loss = compute.loss
    total, tokens, mine = 0.0, 0, None
    for i in range(iters):
        batch = loss.prepare(sampler.next_batch())
        if i % world == rank:
            mine = batch
            count = loss.tokens(batch)
            value = _forward(model, batch, compute)
            if count:  # a batch's loss is its tokens' mean: one with none adds nothing (and is not NaN)
                total += float(value) * count
                tokens += count
    if same_count and iters % world and rank >= iters % world:
        _forward(model, mine if mine is not None else batch, compute)
    model.train()
    return total, tokens


def _forward(model: nn.Module, batch: tuple, compute: "Compute") -> torch.Tensor:
    x, y, *mask = (t.to(compute.device, non_blocking=True) for t in batch)
    with compute.autocast:
        return compute.loss(model, x, y, mask[0] if mask else None)


def sample_text(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, device: torch.device,
                seed: int) -> str:
    """A sample for people to read at eval time (temperature 0.8, top-k 50, seeded); ends at EOS."""
    from ..generation.engine import Engine
    from ..generation.sampling import SamplingParams

    ids = (tokenizer.encode(prompt) if prompt else [tokenizer.eos_id])[-model.config.n_positions:]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=seed)
    # The engine leaves the model as it is (layout, mode), so training goes on bit for bit as a resumed run would.
    [result] = Engine(model, tokenizer, device=device).generate([ids], params)
    return prompt + result.text
