"""`simplegpt train --sft SOURCE` given a source that is not conversations: a missing file, a folder that
`datasets` did not write, a file that is not Parquet, a JSON line nested past Python's recursion limit.
Each is one error line and a non-zero exit, with no run folder left behind (not a traceback)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_gpt
from simplegpt import get_tokenizer
from simplegpt.checkpoint import save_checkpoint
from simplegpt.cli import main

ROOT = Path(__file__).resolve().parents[1]
CHAT = {"messages": [{"role": "user", "content": "add 1 and 2"}, {"role": "assistant", "content": "3"}]}


@pytest.fixture(scope="module")
def byte_base(tmp_path_factory) -> Path:
    tok = get_tokenizer("byte")
    path = tmp_path_factory.mktemp("bytebase") / "base"
    save_checkpoint(path, make_tiny_gpt(vocab_size=tok.vocab_size), tok)
    return path


def _sources(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("not a dataset")
    (tmp_path / "bad.parquet").write_text("garbage")
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.jsonl").write_text(json.dumps(CHAT) + '\n{"messages": ' + deep + "}\n")
    return {"missing": (tmp_path / "missing.jsonl", "missing.jsonl"),
            "folder": (tmp_path / "folder", "folder"),
            "parquet": (tmp_path / "bad.parquet", "bad.parquet"),
            "deep": (tmp_path / "deep.jsonl", "deep.jsonl:2:")}


@pytest.mark.parametrize("kind", ["missing", "folder", "parquet", "deep"])
def test_a_source_that_is_not_conversations_is_one_line(tmp_path, byte_base, capsys, kind):
    source, named = _sources(tmp_path)[kind]
    rc = main(["train", "--sft", str(source), "--init-from", str(byte_base), "--out_dir", str(tmp_path / "run"),
               "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 1, err
    assert "\n" not in err and err.startswith("simplegpt train: error: ") and named in err, err
    assert not (tmp_path / "run").exists()


def test_a_file_that_is_not_parquet_is_one_line_in_a_real_process(tmp_path, byte_base):
    # datasets logs a failed Parquet read on its own handler, which capsys does not see
    source, _ = _sources(tmp_path)["parquet"]
    proc = subprocess.run([sys.executable, "-m", "simplegpt", "train", "--sft", str(source), "--init-from",
                           str(byte_base), "--out_dir", str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"simplegpt train: error: {source}: not a Parquet file ("), proc.stderr


def test_prepare_names_a_jsonl_line_nested_too_deeply(tmp_path, capsys):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.jsonl").write_text('{"text": "hello"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    rc = main(["prepare", str(tmp_path / "texts"), "-o", str(tmp_path / "data")])
    err = capsys.readouterr().err.strip()
    where = tmp_path / "texts" / "a.jsonl"
    assert rc == 1 and err == f"simplegpt prepare: error: {where}:2: the JSON is nested too deeply to read"
    assert not (tmp_path / "data").exists()
