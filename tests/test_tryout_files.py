"""A write where no folder can be made is one line naming the user's path: the file that stands where a
folder must be, or the output itself, never the hidden temporary folder beside it."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_gpt
from simplegpt.atomic import atomic_dir
from simplegpt.checkpoint import save_checkpoint
from simplegpt.tokenizer import ByteTokenizer


def test_a_file_where_a_folder_must_be_is_named(tmp_path):
    (tmp_path / "a-file").write_text("keep")
    for out in (tmp_path / "a-file" / "ck", tmp_path / "a-file" / "deeper" / "ck"):
        with pytest.raises(NotADirectoryError) as e, atomic_dir(out):
            pass
        assert e.value.filename == str(tmp_path / "a-file")
    assert (tmp_path / "a-file").read_text() == "keep"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_a_folder_that_cannot_be_made_names_the_output_not_the_temporary_one():
    with pytest.raises(OSError) as e, atomic_dir("/proc/simplegpt-ck"):
        pass
    assert e.value.filename == "/proc/simplegpt-ck"


def test_import_and_export_gguf_under_a_file_say_so_in_one_line(tmp_path):
    pytest.importorskip("gguf")
    from simplegpt.gguf_export import write_gguf

    gguf = write_gguf(make_tiny_gpt(vocab_size=257), ByteTokenizer(), tmp_path / "m.gguf").path
    (tmp_path / "a-file").write_text("keep")
    run = lambda *a: subprocess.run([sys.executable, "-m", "simplegpt", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    out = run("import-gguf", gguf, tmp_path / "a-file" / "ck")
    assert (out.returncode, out.stderr) == (1, f"simplegpt import-gguf: error: {tmp_path / 'a-file'}: Not a directory\n")
    ck = save_checkpoint(tmp_path / "ck", make_tiny_gpt(vocab_size=257), ByteTokenizer())
    out = run("export-gguf", ck, tmp_path / "a-file" / "m.gguf")
    assert (out.returncode, out.stderr) == (
        1, f"simplegpt export-gguf: error: {tmp_path / 'a-file' / 'm.gguf'}: cannot be written (Not a directory)\n")
    assert (tmp_path / "a-file").read_text() == "keep"


def test_export_gguf_never_puts_a_file_in_place_of_a_pipe_or_device(tmp_path):
    pytest.importorskip("gguf")
    from simplegpt.errors import OutputExistsError
    from simplegpt.gguf_export import write_gguf

    pipe = tmp_path / "pipe.gguf"
    os.mkfifo(pipe)
    with pytest.raises(OutputExistsError, match="pipe.gguf is not a regular file"):
        write_gguf(make_tiny_gpt(vocab_size=257), ByteTokenizer(), pipe, overwrite=True)
    assert stat.S_ISFIFO(pipe.stat().st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["pipe.gguf"]
