"""The training loss: next-token cross-entropy over the targets that take a loss, weighed by tokens.

A batch is (x, y[, attention_mask[, loss_mask]]): x and y (B, T) token ids, y holding IGNORE_INDEX
(-100) where no loss is taken (padding); attention_mask (B, T) 1 = real token; loss_mask (B, T)
1 = this target takes a loss (supervised fine-tuning trains on the answers, not the prompts).
A step's loss is the mean over all the loss tokens of its micro-batches, on every rank: each
micro-batch's mean weighs by its share of the step's loss tokens (`weights`), so a padded
micro-batch of short rows counts as its tokens, and any split of the same rows into micro-batches
gives the same loss and gradients.

Another loss plugs in as an object with the same three methods (the ways of running and the
evaluation call only these).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model import GPT, IGNORE_INDEX


class CrossEntropy:
    """Mean cross-entropy over the targets that are not IGNORE_INDEX (and, with a loss mask, that it keeps)."""

    def prepare(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """(x, y[, attention_mask]) for the model: a loss_mask (4th tensor) is folded into y as
        IGNORE_INDEX where it is 0. Batches without one pass as they are (no copy)."""
        if len(batch) < 4:
            return batch
        x, y, attention_mask, loss_mask = batch
        return x, y.masked_fill(loss_mask == 0, IGNORE_INDEX), attention_mask

    def tokens(self, batch: tuple[torch.Tensor, ...]) -> int:
        """The number of targets of a prepared batch that take a loss (a host sync: the caller needs
        it to weigh micro-batches)."""
        return int((batch[1] != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, attention_mask: torch.Tensor | None,
                 empty: bool = False) -> torch.Tensor:
        """The mean loss (a scalar) of model on x (B, T) against y (B, T). empty: y has no loss token,
        and the loss is 0 with zero gradients (a mean over no tokens is NaN, and 0 x NaN is NaN); the
        forward still runs, so a rank's backward reaches every parameter as DDP and FSDP2 expect."""
        if empty:
            logits, _ = model(x, attention_mask=attention_mask)
            return logits.sum() * 0.0
        if isinstance(model, GPT):  # not a compiled wrapper: loss() may run the whole step in the kernels
            return model.loss(x, y, attention_mask=attention_mask)
        return model(x, y, attention_mask=attention_mask)[1]


def weights(counts: list[int]) -> list[float]:
    """Each micro-batch's share of the step's loss tokens (0 for all when the step has none)."""
    total = max(sum(counts), 1)
    return [count / total for count in counts]


def make_loss(name: str = "cross_entropy") -> CrossEntropy:
    """The loss a run trains with (one today: cross_entropy)."""
    return LOSSES[name]()


LOSSES = {"cross_entropy": CrossEntropy}
