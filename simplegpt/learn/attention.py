"""Attention weights from the plain model, without a second copy of it and without changing it.

GPT's attention calls scaled_dot_product_attention, which never materializes the weights. To see
them, the model runs as a view (simplegpt.views.module_view: new module objects over the same
Parameter objects) whose attention modules compute softmax(q k^T / sqrt(D) + mask) explicitly and
keep it. The view's logits are the model's logits (tests/test_inspect.py checks it), so the weights
shown are the ones the model uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..model import GPT, CausalSelfAttention, LayerKV
from ..views import module_view


class RecordingAttention(CausalSelfAttention):
    """CausalSelfAttention that computes its weights explicitly and keeps the last ones in .weights."""

    weights: torch.Tensor  # (B, H, T, S), set by attend

    def attend(self, qkv: torch.Tensor, mask: torch.Tensor | None, kv: LayerKV | None,
               rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """As CausalSelfAttention.attend, (B, T, (H + 2K) D) -> (B, T, H D), recording the (B, H, T, S) weights."""
        if kv is not None:
            raise ValueError("attention weights are recorded on whole sequences, without a KV cache")
        B, T, _ = qkv.shape
        q, k, v = self.heads(qkv, rope)  # q (B, H, T, D); k, v (B, K, T, D)
        group = self.n_head // self.n_kv_head  # query heads per key/value head
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, T, D)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, T)
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=qkv.device).tril()  # (T, S): causal
        # exp(-inf) = 0: a masked key gets exactly zero weight, as in SDPA's boolean mask
        self.weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        y = self.weights @ v  # (B, H, T, D)
        return y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)


def _swap(m: nn.Module) -> type | None:
    return RecordingAttention if type(m) is CausalSelfAttention else None


@torch.no_grad()
def attention_weights(model: GPT, idx: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `model` (unchanged, in eval mode: no dropout) on idx (B, T) and return its logits (B, T, V)
    and the attention weights of every layer and head, (L, B, H, T, T) float32: row t holds how much
    query position t reads each key position; rows sum to 1 and keys after t get exactly 0.
    attention_mask (B, T), 1 = real token, as in GPT.forward. Raises ValueError for ids the model
    cannot take (out of its vocabulary, longer than its context)."""
    view = module_view(model, _swap, training=False)
    # GPT's own forward: a subclass such as the tutorial's SimpleGPT may return the logits alone
    logits, _ = GPT.forward(view, idx, attention_mask=attention_mask)
    weights = torch.stack([block.attn.weights for block in view.transformer.h]).float()
    return logits, weights
