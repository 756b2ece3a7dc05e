"""An Inspection on disk: its pictures as PNG files, its arrays as one .npz and, when asked, one
self-contained HTML page with every picture in it."""

from __future__ import annotations

import html
from pathlib import Path

from . import figures
from .inspection import Inspection
from .page import html_page, img_tag, png_bytes, table, write_text_atomic

ARRAYS_FILE = "inspect.npz"
PAGE_FILE = "inspect.html"


def write_inspection(insp: Inspection, out: str | Path, with_html: bool = False, source: str = "") -> list[Path]:
    """Write attention_layer{L}.png for each layer, next_tokens.png, positions.png and inspect.npz
    (Inspection.save) into out (made if missing), and inspect.html when with_html; source names the
    checkpoint on the page. Returns the paths written. Raises OSError when out cannot be written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pictures: list[tuple[str, str, bytes]] = []  # (file name, caption, png)
    for layer, weights in enumerate(insp.attention):
        pictures.append((f"attention_layer{layer}.png", f"Attention, layer {layer}",
                         png_bytes(figures.attention_figure(weights, insp.tokens, layer))))
    pictures.append(("next_tokens.png", "Next-token predictions", png_bytes(figures.next_token_figure(insp))))
    caption = "Rotary positions" if insp.positions == "rotary" else "Position embeddings"
    pictures.append(("positions.png", caption,
                     png_bytes(figures.position_figure(insp.position_similarity, insp.positions))))
    written = []
    for name, _, png in pictures:
        (out / name).write_bytes(png)
        written.append(out / name)
    written.append(insp.save(out / ARRAYS_FILE))
    if with_html:
        written.append(write_text_atomic(out / PAGE_FILE, inspection_page(insp, pictures, source)))
    return written


def inspection_page(insp: Inspection, pictures: list[tuple[str, str, bytes]], source: str) -> str:
    L, H, T, _ = insp.attention.shape
    facts = {"checkpoint": source or "(not saved)", "text": insp.text, "tokens": T, "layers": L, "heads per layer": H}
    tokens = " ".join(f"{i}:{html.escape(tok)}" for i, tok in enumerate(insp.tokens))
    body = [table(facts), f'<p class="note">tokens (position:text, a space shown as ·): {tokens}</p>',
            '<p class="note">Attention: in each map, row t is the token at position t and its columns say how much '
            "of each earlier token it mixes into itself; the model cannot read later tokens, so everything above "
            "the diagonal is zero.</p>"]
    for name, caption, png in pictures:
        body.append(f"<h2>{html.escape(caption)}</h2>{img_tag(png, caption)}")
    return html_page("simplegpt inspect", "\n".join(body))
