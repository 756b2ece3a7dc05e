"""`simplegpt chat` on odd input, in a real subprocess: /save to a folder, a missing folder or a pipe is
one line naming the path and leaves no file behind; a base model whose characters cannot spell the plain
prompt is refused at the start in one line."""

import os
import stat
from pathlib import Path

import pytest

from conftest import make_tiny_gpt
from simplegpt import save_checkpoint
from simplegpt.tokenizer import CharTokenizer
from test_chat_cli import chat, chat_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return chat_checkpoint(tmp_path_factory.mktemp("chat") / "tiny")


def test_save_to_a_folder_a_missing_folder_or_a_pipe_names_the_path_and_leaves_nothing(checkpoint, tmp_path):
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "pipe")
    out = chat(checkpoint, ["/save folder", "/save missing/chat.json", "/save pipe", "/save ok.json"], cwd=tmp_path)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert errors == ["simplegpt chat: error: folder is a folder; /save needs a file name: /save folder/chat.json",
                      "simplegpt chat: error: missing/chat.json: cannot be written (No such file or directory)",
                      "simplegpt chat: error: pipe is not a regular file; /save writes a new file or replaces one"]
    assert "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "ok.json", "pipe"]  # no temporary file left
    assert stat.S_ISFIFO((tmp_path / "pipe").stat().st_mode)
    assert list((tmp_path / "folder").iterdir()) == []


def test_a_base_model_that_cannot_spell_the_plain_prompt_is_refused_at_the_start(tmp_path):
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz \n")  # no 'U', 'A' or ':'
    path = save_checkpoint(tmp_path / "lower", make_tiny_gpt(vocab_size=tok.vocab_size), tok)
    out = chat(path, ["hello", "there"], cwd=tmp_path)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"simplegpt chat: error: {path} has no chat template, and its vocabulary lacks characters of the plain "
        "'User: ... / Assistant:' prompt ('U', ':', 'A'); chat with a model trained with --tokenizer byte, gpt2 "
        "or bpe:N, or one fine-tuned for chat"]


def test_the_server_says_a_base_model_cannot_spell_the_plain_chat_prompt(tmp_path):
    pytest.importorskip("fastapi")
    from simplegpt.serve.chat import chat_input
    from simplegpt.serve.errors import APIError
    from simplegpt.serve.schemas import ChatMessage

    messages = [ChatMessage(role="user", content="hello")]
    with pytest.raises(APIError) as e:
        chat_input(CharTokenizer("abcdefghijklmnopqrstuvwxyz \n"), messages)
    assert (e.value.status, e.value.param, e.value.message) == (
        400, "messages", "this model has no chat template, and its plain 'User: ... / Assistant:' chat prompt "
        "needs characters not in the character vocabulary ('U', ':', 'A'); send plain text to /v1/completions")
    spelled = CharTokenizer("abcdefghijklmnopqrstuvwxyz \nUA:")
    assert chat_input(spelled, messages) == ("User: hello\nAssistant:", ["\nUser:"])
