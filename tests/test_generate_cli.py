"""`simplegpt generate` end to end: real checkpoints, real subprocesses for stdin and -i."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_gpt
from simplegpt import get_tokenizer, load_checkpoint, save_checkpoint
from simplegpt.cli import main
from simplegpt.engine import Engine, SamplingParams


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tok = get_tokenizer("byte")
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", make_tiny_gpt(vocab_size=tok.vocab_size), tok)


def expected_text(checkpoint: Path, prompt: str, **kw) -> str:
    ck = load_checkpoint(checkpoint)
    return Engine(ck.model, ck.tokenizer).generate([prompt], SamplingParams(**kw))[0].text


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simplegpt", "generate", *args], input=stdin, text=True,
                          capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_prompt_option_stream_and_samples(checkpoint, capsys):
    base = ["--checkpoint", str(checkpoint), "--max-new-tokens", "50", "--quiet"]
    greedy = expected_text(checkpoint, "ROMEO:", max_new_tokens=50, temperature=0)
    assert main(["generate", *base, "--prompt", "ROMEO:", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "ROMEO:" + greedy + "\n"
    assert main(["generate", *base, "--prompt", "ROMEO:", "--temperature", "0", "--stream", "--no-echo"]) == 0
    assert capsys.readouterr().out == greedy + "\n"
    sampled = [expected_text(checkpoint, "A", max_new_tokens=50, seed=3 + i, top_k=20) for i in range(2)]
    for stream in ([], ["--stream"]):
        assert main(["generate", *base, "--prompt", "A", "--seed", "3", "--top-k", "20", "--num-samples", "2",
                     "--no-echo", *stream]) == 0
        out = capsys.readouterr().out
        assert out == f"--- sample 1 ---\n{sampled[0]}\n--- sample 2 ---\n{sampled[1]}\n"


def test_stop_prompt_file_and_int8(checkpoint, capsys, tmp_path):
    text = expected_text(checkpoint, "hello", max_new_tokens=30, temperature=0)
    stop = text[5:8]
    f = tmp_path / "prompt.txt"
    f.write_text("hello", encoding="utf-8")
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt-file", str(f), "--temperature", "0",
                 "--max-new-tokens", "30", "--stop", "zzz", "--stop", stop, "--no-echo"]) == 0
    captured = capsys.readouterr()
    assert captured.out == text[:text.index(stop)] + "\n"
    assert "finish: stop" in captured.err
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "hello", "--quantize", "int8",
                 "--max-new-tokens", "10", "--device", "cpu"]) == 0
    assert "int8: linear weights" in capsys.readouterr().err


def test_long_prompt_warns_in_one_line(checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a" * 40, "--max-new-tokens", "3",
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err == ("simplegpt generate: warning: prompt of 40 tokens is longer than the model's window of 32: "
                   "keeping its last 32 tokens\n")


def test_prompt_from_stdin_and_interactive_session(checkpoint):
    args = ["--checkpoint", str(checkpoint), "--temperature", "0", "--max-new-tokens", "20", "--no-echo", "--quiet"]
    first = expected_text(checkpoint, "first", max_new_tokens=20, temperature=0)
    second = expected_text(checkpoint, "second", max_new_tokens=20, temperature=0)
    piped = cli(*args, stdin="first\n")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == first + "\n"
    session = cli(*args, "-i", stdin="first\n\nsecond\n/quit\nnever read\n")
    assert session.returncode == 0, session.stderr
    assert session.stdout == first + "\n" + second + "\n"


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--num-samples", "0"], "--num-samples must be a positive integer"),
    (["--prompt-file", "/nonexistent/p.txt"], "does not exist"),
    (["--device", "nonsense"], "is not a device"),
])
def test_bad_options_fail_with_one_line(checkpoint, capsys, extra, message):
    args = ["generate", "--checkpoint", str(checkpoint), *extra]
    if "--prompt-file" not in extra:
        args += ["--prompt", "x"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("simplegpt generate: error:")


def test_missing_or_corrupt_checkpoint_and_empty_stdin(checkpoint, tmp_path):
    missing = cli("--checkpoint", str(tmp_path / "nope"), "--prompt", "x")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in checkpoint.rglob("*"):
        if f.is_file():
            (bad / f.relative_to(checkpoint)).parent.mkdir(parents=True, exist_ok=True)
            (bad / f.relative_to(checkpoint)).write_bytes(f.read_bytes())
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    corrupt = cli("--checkpoint", str(bad), "--prompt", "x")
    assert corrupt.returncode == 1 and "corrupted" in corrupt.stderr and "Traceback" not in corrupt.stderr
    empty = cli("--checkpoint", str(checkpoint), stdin="")
    assert empty.returncode == 1 and "no prompt" in empty.stderr
