"""The tutorial's API (SimpleDataset, GPTBlock, SimpleGPT, train, generate_text), fixed.

Code written against "Understanding GPT: How To Implement a Simple GPT Model with PyTorch"
runs unchanged; underneath it is simplegpt's one GPT-2 model. What was wrong and what
changed is in docs/seed-fixes.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .devices import default_device
from .model import GPT, IGNORE_INDEX, Block, GPTConfig

GPTBlock = Block


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    return ids.flatten().tolist() if isinstance(ids, torch.Tensor) else list(ids)


def _eos_id(tokenizer) -> int | None:
    """EOS id of a simplegpt tokenizer (eos_id) or a Hugging Face one (eos_token_id)."""
    eos = getattr(tokenizer, "eos_id", None)
    return eos if eos is not None else getattr(tokenizer, "eos_token_id", None)


def _decode(tokenizer, ids: list[int]) -> str:
    if hasattr(tokenizer, "eos_token_id"):  # Hugging Face and simplegpt tokenizers take skip_special_tokens
        return tokenizer.decode(ids, skip_special_tokens=True)
    eos = _eos_id(tokenizer)
    return tokenizer.decode([i for i in ids if i != eos])


def config_from_any(config) -> GPTConfig:
    """A GPTConfig from a GPTConfig or a transformers.GPT2Config (read by field name)."""
    if isinstance(config, GPTConfig):
        return config
    needed = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
    if not all(hasattr(config, f) for f in needed):
        raise TypeError(
            f"SimpleGPT needs a GPTConfig or a transformers.GPT2Config, got {type(config).__name__}"
        )
    return GPTConfig(
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        dropout=float(getattr(config, "resid_pdrop", 0.0) or 0.0),
        layer_norm_epsilon=float(getattr(config, "layer_norm_epsilon", 1e-5)),
    )


class SimpleDataset(Dataset):
    """Texts padded to max_length: items are dicts of input_ids, attention_mask and labels.

    labels equal input_ids except on padding, where they are -100 so padding never counts
    in the loss. Works with a simplegpt tokenizer or a Hugging Face one (padded with EOS).
    """

    def __init__(self, texts: list[str], tokenizer, max_length: int):
        if max_length <= 0:
            raise ValueError(f"max_length must be a positive integer, got {max_length}")
        if not texts:
            raise ValueError("SimpleDataset needs at least one text")
        self.texts = list(texts)
        self.tokenizer = tokenizer
        self.max_length = max_length
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else _eos_id(tokenizer)
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        ids = _encode(self.tokenizer, self.texts[idx])[: self.max_length]
        if not ids:
            raise ValueError(f"text {idx} is empty after tokenization; remove it from the dataset")
        n_pad = self.max_length - len(ids)
        input_ids = torch.tensor(ids + [self.pad_id] * n_pad, dtype=torch.long)
        attention_mask = torch.tensor([1] * len(ids) + [0] * n_pad, dtype=torch.long)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class SimpleGPT(GPT):
    """The tutorial's model class: GPT-2 built from a GPT2Config or GPTConfig, forward -> logits."""

    def __init__(self, config):
        super().__init__(config_from_any(config))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits, _ = super().forward(input_ids, attention_mask=attention_mask)
        return logits


def _unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    if isinstance(batch, dict):
        input_ids, mask = batch["input_ids"], batch.get("attention_mask")
        labels = batch.get("labels")
    else:  # the tutorial's (input_ids, attention_mask) tuples
        input_ids, mask = batch[0], batch[1] if len(batch) > 1 else None
        labels = None
    if labels is None:
        labels = input_ids if mask is None else input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    return input_ids, mask, labels


def train(model, dataloader, optimizer, criterion=None, epochs: int = 5, device=None) -> list[float]:
    """The tutorial's loop: next-token cross-entropy, printing 'Epoch e/E, Loss: x'.

    Padding is excluded from the loss (labels -100); returns the mean loss of each epoch.
    """
    device = device or default_device()
    criterion = criterion or nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    model.to(device)
    model.train()
    history = []
    for epoch in range(epochs):
        total_loss = 0.0
        for batch in dataloader:
            input_ids, mask, labels = (t.to(device) if t is not None else None for t in _unpack_batch(batch))
            outputs = model(input_ids, mask)
            logits = outputs[0] if isinstance(outputs, tuple) else outputs
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss = criterion(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
        mean = total_loss / max(len(dataloader), 1)
        history.append(mean)
        print(f"Epoch {epoch + 1}/{epochs}, Loss: {mean}")
    return history


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_length: int = 50, device=None) -> str:
    """Greedy decoding of up to max_length new tokens after prompt; stops at EOS.

    The context is cropped to the model's last n_positions tokens, so long outputs never crash.
    Returns the prompt followed by the generated text, like the tutorial.
    """
    from .generation.engine import generate_ids

    device = device or default_device()
    model.to(device)
    ids = _encode(tokenizer, prompt)
    new = generate_ids(model, ids, max_new_tokens=max_length, eos_id=_eos_id(tokenizer), device=device)
    return _decode(tokenizer, ids + new)
