"""Self-contained HTML pages: images inlined as data: URIs, styles inline, no scripts and no
outside resources, so a page opens offline, from a file, anywhere. Used by `simplegpt inspect --html`
and the run report."""

from __future__ import annotations

import base64
import html
import io
import os
import warnings
from pathlib import Path

from matplotlib.figure import Figure

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
table { border-collapse: collapse; } td, th { padding: 0.15em 0.8em 0.15em 0; text-align: left; vertical-align: top; }
th { font-weight: 600; color: #555; } pre { background: #f6f6f6; padding: 0.8em; white-space: pre-wrap; }
.note { color: #666; }
"""


def png_bytes(fig: Figure, dpi: int = 90) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def img_tag(png: bytes, alt: str) -> str:
    """An <img> holding the PNG itself (a data: URI)."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def table(rows: dict[str, object]) -> str:
    """A two-column table of names and values, escaped."""
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items())
    return f"<table>{cells}</table>"


def html_page(title: str, body: str) -> str:
    """A complete page around body (HTML the caller escaped)."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
            f"<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def write_text_atomic(path: Path, text: str) -> Path:
    """Write text to path through a temp file and os.replace: a reader never sees half a page, and
    a page already there stays whole if writing fails. Raises OSError."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
