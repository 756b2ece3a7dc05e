"""One import path per thing: simplegpt's own modules import each name from the module that defines it,
never through the modules that gather public names for users (simplegpt.engine, simplegpt.trainer), and
no submodule shares a name with what `import simplegpt` exports (the tutorial's `train` stays a function
whatever is imported, with no import-order trick)."""

import ast
import subprocess
import sys

import pytest

import simplegpt
from conftest import ROOT

PACKAGE = ROOT / "simplegpt"
# Modules that only re-export names defined elsewhere, for users (README "Library").
FOR_USERS = {"simplegpt.engine", "simplegpt.trainer"}
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).as_posix() not in
                 {"engine.py", "trainer.py", "__init__.py"})


def module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path) -> set[str]:
    """The absolute names of the modules (and `from X import name` targets) path imports."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_module_of_the_package_imports_a_re_exporting_module(path):
    assert not imports(path) & FOR_USERS, f"{path.relative_to(ROOT)} imports {imports(path) & FOR_USERS}"


def test_the_imports_are_read_as_python_resolves_them():
    """The checker above resolves relative imports; it must see `from ..engine import X` in a subpackage."""
    generate = PACKAGE / "commands" / "generate.py"
    assert "simplegpt.cli.add_engine_arguments" in imports(generate)
    assert "simplegpt.generation.sampling.SamplingParams" in imports(generate)


def test_no_submodule_is_named_after_a_name_the_package_exports():
    """`import simplegpt.X` binds X on the package: a submodule named like an exported name (the module
    simplegpt.train and the tutorial's function train) would replace that name once imported."""
    submodules = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert not submodules & set(simplegpt.__all__)


def test_the_tutorials_train_stays_a_function_after_every_public_module_is_imported():
    code = ("import simplegpt.trainer, simplegpt.engine, simplegpt.training.loop, simplegpt.generation\n"
            "from simplegpt import SimpleGPT, SimpleDataset, train, generate_text\n"
            "import simplegpt.tutorial\n"
            "assert train is simplegpt.tutorial.train and simplegpt.train is train, train\n"
            "from simplegpt.trainer import train as run\n"
            "import simplegpt.training.loop\n"
            "assert run is simplegpt.training.loop.train\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
