"""Text generation. This first version is the uncached reference loop; see issue on the engine."""

from __future__ import annotations

import torch

from .model import GPT


@torch.no_grad()
def generate_ids(model: GPT, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None,
                 device: str | torch.device = "cpu") -> list[int]:
    """Greedy decoding without a cache; the context slides to the last n_positions tokens."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    model.eval()
    window = model.config.n_positions
    seq = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits, _ = GPT.forward(model, seq[:, -window:])
        nxt = int(logits[0, -1].argmax())
        new.append(nxt)
        if nxt == eos_id:
            break
        seq = torch.cat([seq, torch.tensor([[nxt]], device=device)], dim=1)
    return new
