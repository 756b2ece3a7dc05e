"""What a model does with one text: its attention at every layer and head, what it predicts after
each position, and how alike its position embeddings are. Numbers here; pictures in figures.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..model import GPT, rotary_angles
from ..tokenizer import Tokenizer
from .attention import attention_weights


@dataclass
class Inspection:
    """One text through one model. T = tokens, L = layers, H = heads, K = top_k, P = n_positions."""

    text: str
    ids: list[int]
    tokens: list[str]  # (T,) each token's text, made visible (token_labels)
    attention: np.ndarray  # (L, H, T, T) float32, row = query position, column = key position
    top_ids: np.ndarray  # (T, K) int64: the K most likely next tokens after each position
    top_probs: np.ndarray  # (T, K) float32: their probabilities, softmax of the logits
    top_tokens: list[list[str]]  # (T, K) their texts
    position_similarity: np.ndarray  # (P, P) float32, cosine similarity of the positions (position_similarity)
    positions: str = "learned"  # the model's kind of positions (GPTConfig.positions): what the similarity is of

    def save(self, path: str | Path) -> Path:
        """The arrays as one .npz (attention, top_ids, top_probs, position_similarity, ids)."""
        path = Path(path)
        np.savez_compressed(path, attention=self.attention, top_ids=self.top_ids, top_probs=self.top_probs,
                            position_similarity=self.position_similarity, ids=np.asarray(self.ids, np.int64))
        return path


def token_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Each token's text on its own, with what a label would hide made visible: a space as '·',
    a newline as '\\n', a tab as '\\t', the end-of-text token as '<eos>', and the bytes of a token
    that holds part of a character in hex ('<C3>')."""
    out = []
    for i in ids:
        if i == tokenizer.eos_id:
            out.append("<eos>")
            continue
        raw = tokenizer.decode_bytes([i])
        try:
            piece = raw.decode("utf-8")
        except UnicodeDecodeError:
            piece = "".join(f"<{b:02X}>" for b in raw)
        out.append(piece.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t") or "∅")
    return out


def encode_for(model: GPT, tokenizer: Tokenizer, text: str) -> list[int]:
    """text's token ids, checked against the model: DataError for an empty text, a character the
    tokenizer does not know, or more tokens than the model's context holds."""
    if not text:
        raise DataError("the text is empty; give at least one character")
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:  # a character outside a char vocabulary: the tokenizer names it
        raise DataError(f"the text does not fit the model's tokenizer: {e}") from None
    n = model.config.n_positions
    if len(ids) > n:
        raise DataError(f"the text is {len(ids)} tokens long, longer than the model's context of {n} tokens; "
                        f"shorten it to at most {n} tokens")
    if not ids:
        raise DataError("the text encodes to no tokens; give some text the tokenizer turns into tokens")
    if max(ids) >= model.config.vocab_size:
        raise DataError(f"the tokenizer gives token id {max(ids)}, outside the model's vocabulary of "
                        f"{model.config.vocab_size}; this tokenizer does not belong to this model")
    return ids


# Rotary models have no table to read: their positions' similarity is computed for at most this many.
ROTARY_POSITIONS = 1024


def position_similarity(model: GPT) -> np.ndarray:
    """(P, P) cosine similarity between the positions: of the learned position embeddings, or for
    rotary positions of each position's rotation (cos and sin of its angles, P at most
    ROTARY_POSITIONS), which depends on the distance alone. A bright band near the diagonal means
    nearby positions look alike to the model."""
    if "wpe" in model.transformer:
        table = model.transformer.wpe.weight.detach().float()
    else:
        n = min(model.config.n_positions, ROTARY_POSITIONS)
        cos, sin = rotary_angles(model.config, torch.arange(n)[None])  # (1, 1, P, D) each
        table = torch.cat([cos[0, 0], sin[0, 0]], dim=-1)  # (P, 2D)
    unit = torch.nn.functional.normalize(table, dim=-1)
    return (unit @ unit.T).cpu().numpy()


@torch.no_grad()
def inspect_text(model: GPT, tokenizer: Tokenizer, text: str, top_k: int = 5) -> Inspection:
    """Run text through model (left unchanged) and collect what the pictures show. DataError for a
    text the model cannot take (see encode_for); ValueError for top_k < 1."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    ids = encode_for(model, tokenizer, text)
    device = next(model.parameters()).device
    logits, weights = attention_weights(model, torch.tensor([ids], device=device))
    # ids past the tokenizer's (an imported model's padded embedding) have no text, and the engine never
    # draws them: the bars are over the tokenizer's ids, as sampling is
    vocab = min(logits.size(-1), tokenizer.vocab_size)
    probs = torch.softmax(logits[0, :, :vocab].float(), dim=-1)  # (T, V)
    top = probs.topk(min(top_k, probs.size(-1)), dim=-1)
    top_ids = top.indices.cpu().numpy()
    return Inspection(
        text=text, ids=ids, tokens=token_labels(tokenizer, ids),
        attention=weights[:, 0].cpu().numpy(),
        top_ids=top_ids, top_probs=top.values.cpu().numpy(),
        top_tokens=[token_labels(tokenizer, row.tolist()) for row in top_ids],
        position_similarity=position_similarity(model), positions=model.config.positions,
    )
