"""docs/architecture.md names the modules that exist: every source file it names in backquotes is a
path in the checkout, or a path (or bare name) that one of the package's folders holds."""

import re

from conftest import ROOT

PACKAGE = ROOT / "simplegpt"


def test_every_module_architecture_md_names_exists():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([\w/.]+\.(?:py|c|h))`", text)) - {"simplegpt/commands/NAME.py"}  # the template
    names = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*")}

    def exists(ref: str) -> bool:  # a path from the checkout, the package or one of its folders
        return (ROOT / ref).exists() or any(n == ref or n.endswith("/" + ref) for n in names)

    assert named and sorted(ref for ref in named if not exists(ref)) == []
