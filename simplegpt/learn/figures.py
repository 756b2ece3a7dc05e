"""The pictures, as matplotlib Figures made without pyplot (no global state, no display needed):
attention maps, next-token bars, position-embedding similarity and masks. Each returns a Figure;
page.png_bytes turns it into a PNG. matplotlib is a core dependency, imported here only."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from .inspection import Inspection

MAX_LABELS = 48  # more tick labels than this on an axis overlap: then only every n-th is shown
MAX_BAR_POSITIONS = 64  # next_token_figure draws the last this many positions (the .npz keeps them all)


def _label_axes(ax, tokens: Sequence[str], y_labels: bool = True) -> None:
    step = max(1, math.ceil(len(tokens) / MAX_LABELS))
    ticks = list(range(0, len(tokens), step))
    ax.set_xticks(ticks, [tokens[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [tokens[i] for i in ticks] if y_labels else [], fontsize=7)


def _panel_inches(n: int) -> float:
    return min(max(2.6, 0.18 * n + 1.0), 9.0)


def attention_figure(weights: np.ndarray, tokens: Sequence[str], layer: int) -> Figure:
    """One layer's heads side by side: weights (H, T, T), row = the query token that reads,
    column = the key token it reads from; brighter = more weight (0..1)."""
    H, T = weights.shape[0], weights.shape[1]
    cols = min(H, 4)
    rows = math.ceil(H / cols)
    size = _panel_inches(T)
    fig = Figure(figsize=(cols * size + 1.0, rows * size + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.axis("off")
            continue
        im = ax.imshow(weights[h], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        _label_axes(ax, tokens, y_labels=h % cols == 0)
    fig.colorbar(im, ax=axes, shrink=0.8, label="attention weight")
    fig.suptitle(f"layer {layer}: each row is a token, reading the tokens before it (columns)", fontsize=10)
    return fig


def next_token_figure(insp: Inspection) -> Figure:
    """A small bar chart per position: the top-k next tokens the model predicts after reading the
    text up to and including that position, with their probabilities. A text longer than
    MAX_BAR_POSITIONS tokens gets its last MAX_BAR_POSITIONS positions (a taller figure is unreadable)."""
    T, K = insp.top_probs.shape
    first = max(0, T - MAX_BAR_POSITIONS)
    shown = T - first
    cols = min(shown, 4)
    rows = math.ceil(shown / cols)
    fig = Figure(figsize=(cols * 3.0, rows * (0.28 * K + 0.8)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        t = first + i
        if t >= T:
            ax.axis("off")
            continue
        y = np.arange(K)
        ax.barh(y, insp.top_probs[t], color="tab:blue")
        ax.set_yticks(y, insp.top_tokens[t], fontsize=7)
        ax.invert_yaxis()  # the most likely on top
        ax.set_xlim(0, 1)
        ax.tick_params(axis="x", labelsize=6)
        context = "".join(insp.tokens[max(0, t - 7):t + 1])
        ax.set_title(f"{t}: after …{context}" if t > 7 else f"{t}: after {context}", fontsize=8, loc="left")
    fig.suptitle("next-token probabilities at each position (top tokens)"
                 + (f", positions {first} to {T - 1} of {T}" if first else ""), fontsize=10)
    return fig


# position_figure's title per kind of positions (GPTConfig.positions)
POSITION_TITLES = {"learned": "how alike the position embeddings are (cosine similarity)",
                   "rotary": "how alike the positions' rotations are (cosine similarity of their cos | sin)"}


def position_figure(similarity: np.ndarray, positions: str = "learned") -> Figure:
    """similarity (P, P): cosine similarity of positions i and j, from -1 to 1: of their learned
    embeddings, or with positions="rotary" of their rotations (inspection.position_similarity)."""
    fig = Figure(figsize=(5.5, 4.6), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(similarity, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    ax.set_xlabel("position")
    ax.set_ylabel("position")
    ax.set_title(POSITION_TITLES[positions], fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.85)
    return fig


def mask_figure(mask: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str] | None = None,
                title: str = "") -> Figure:
    """A 0/1 mask (rows, columns), e.g. the causal mask (T, T) or a batch's attention mask (B, T):
    1 (dark) = may attend / a real token, 0 (light) = masked / padding."""
    rows, cols = mask.shape
    fig = Figure(figsize=(min(max(3.0, 0.3 * cols + 1.5), 10.0), min(max(1.6, 0.3 * rows + 1.2), 10.0)),
                 layout="constrained")
    ax = fig.subplots()
    ax.imshow(np.asarray(mask, dtype=float), cmap="Greys", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(rows), list(row_labels), fontsize=7)
    if col_labels is not None:
        ax.set_xticks(range(cols), list(col_labels), rotation=90, fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return fig

