"""The order in which the C kernels take a GPT-2 block's parameters: one list for every caller.

The list is csrc/slots.h's BLOCK_SLOTS, read from the header at import, so C and Python share one
definition (lib.py also checks the compiled library's copy at load). Each slot is (submodule path
inside model.Block, parameter name); a missing bias is passed as NULL.
"""

from __future__ import annotations

import re
from pathlib import Path

HEADER = Path(__file__).parent / "csrc" / "slots.h"


def read_slots(header: Path = HEADER) -> tuple[tuple[str, str], ...]:
    """The (module, parameter) entries of the BLOCK_SLOTS X-macro in `header`, in order.

    Raises RuntimeError where the header has no such list (a broken install)."""
    text = header.read_text()
    body = re.search(r"#define BLOCK_SLOTS\(X\)((?:.*\\\n)*.*)", text)
    slots = tuple(re.findall(r'X\(\s*\w+\s*,\s*"([^"]+)"\s*,\s*"([^"]+)"\s*\)', body.group(1))) if body else ()
    if not slots:
        raise RuntimeError(f"no BLOCK_SLOTS list in {header}")
    return slots


BLOCK_SLOTS: tuple[tuple[str, str], ...] = read_slots()
