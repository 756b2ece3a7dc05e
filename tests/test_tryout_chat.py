"""`simplegpt chat` on odd input, in a real subprocess: /save to a folder or a missing folder is one
line naming the path and leaves no file behind."""

from pathlib import Path

import pytest

from test_chat_cli import chat, chat_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return chat_checkpoint(tmp_path_factory.mktemp("chat") / "tiny")


def test_save_to_a_folder_or_a_missing_folder_names_the_path_and_leaves_nothing(checkpoint, tmp_path):
    (tmp_path / "folder").mkdir()
    out = chat(checkpoint, ["/save folder", "/save missing/chat.json", "/save ok.json"], cwd=tmp_path)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert errors == ["simplegpt chat: error: folder is a folder; /save needs a file name: /save folder/chat.json",
                      "simplegpt chat: error: missing/chat.json: cannot be written (No such file or directory)"]
    assert "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "ok.json"]  # no temporary file left
    assert list((tmp_path / "folder").iterdir()) == []

