"""simplegpt.files: the one cache folder and the one checksum helper every layer uses."""

import hashlib
import os
import subprocess
import sys

import pytest

from simplegpt.accel.cpu import lib
from simplegpt.files import cache_dir, sha256_file


def test_cache_dir_is_simplegpt_cache_else_xdg_cache_home_else_home(monkeypatch, tmp_path):
    monkeypatch.delenv("SIMPLEGPT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "simplegpt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "simplegpt"
    monkeypatch.setenv("SIMPLEGPT_CACHE", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"


@pytest.mark.skipif(lib.load() is None, reason=f"native kernel unavailable: {lib.unavailable_reason()}")
def test_the_c_kernels_are_built_under_xdg_cache_home(tmp_path):
    """A fresh process with only XDG_CACHE_HOME set builds its kernels into $XDG_CACHE_HOME/simplegpt/native."""
    env = {k: v for k, v in os.environ.items() if k not in ("SIMPLEGPT_CACHE", "SIMPLEGPT_NATIVE")}
    env.update(XDG_CACHE_HOME=str(tmp_path), HOME=str(tmp_path / "home"))
    code = "from simplegpt.accel.cpu import lib; print(lib.load() is not None)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr
    assert list((tmp_path / "simplegpt" / "native").glob("kernels-*.so"))
    assert not (tmp_path / "home").exists()


def test_sha256_file_is_the_digest_of_the_bytes(tmp_path):
    data = os.urandom(3 << 20)  # more than one read chunk
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    with pytest.raises(OSError):
        sha256_file(tmp_path / "missing")
