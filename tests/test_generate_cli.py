"""`simplegpt generate` end to end: real checkpoints, real subprocesses for stdin and -i."""

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_tiny_gpt
from simplegpt import get_tokenizer, load_checkpoint, save_checkpoint
from simplegpt.cli import main
from simplegpt.engine import Engine, SamplingParams
from simplegpt.tokenizer import CharTokenizer


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


def test_tiny_temperatures_and_penalties_are_greedy_not_a_crash(checkpoint, capsys):
    """--temperature 1e-40 overflowed logits / temperature to NaN and ended in a traceback; below 1e-5
    it is greedy. A repetition penalty of 1e-45 saturates instead of overflowing."""
    base = ["generate", "--checkpoint", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--quiet",
            "--no-echo"]
    greedy = expected_text(checkpoint, "ROMEO:", max_new_tokens=20, temperature=0)
    for temperature in ("1e-40", "1e-45", "5e-324", "9e-6"):
        assert main([*base, "--temperature", temperature]) == 0
        assert capsys.readouterr().out == greedy + "\n"
    assert main([*base, "--repetition-penalty", "1e-45", "--temperature", "1e-30", "--seed", "1"]) == 0
    assert main([*base, "--repetition-penalty", "1e-45", "--seed", "1"]) == 0


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


@pytest.fixture(scope="module")
def char_checkpoint(tmp_path_factory) -> Path:
    """A character-level model whose vocabulary lacks most letters, in a run folder: run/best."""
    tok = CharTokenizer.from_text("abcdefgh ijklmnop\n")
    return save_checkpoint(tmp_path_factory.mktemp("runs") / "run" / "best",
                           make_tiny_gpt(vocab_size=tok.vocab_size), tok)


def test_a_prompt_outside_the_vocabulary_is_one_line(char_checkpoint):
    proc = cli("--checkpoint", str(char_checkpoint), "--prompt", "abz", "--max-new-tokens", "3")
    assert proc.returncode == 1 and proc.stderr.startswith("simplegpt generate: error: the prompt cannot be encoded")
    assert len(proc.stderr.splitlines()) == 1 and "'z'" in proc.stderr


def test_interactive_session_goes_on_after_a_bad_prompt_and_takes_multi_line_prompts(char_checkpoint):
    """Issue 16: one bad prompt ended the session, and a newline could not be entered."""
    prompts = ["abc", "ab\ncd", "fe\n\n  g", "ab\ncd\n"]
    stdin = ('abc\n'
             'xyz\n'                        # outside the vocabulary: one error line, the session goes on
             'ab\\\ncd\n'                   # a trailing backslash goes on to the next line
             '"""\nfe\n\n  g\n"""\n'         # a block, empty line and indentation kept
             'ab\udce9\n'                   # not UTF-8 (written as the byte 0xe9 below)
             '\n'                           # skipped
             '"""\nab\ncd\n\n')             # EOF ends the open block, which is still a prompt
    args = ["--checkpoint", str(char_checkpoint), "--temperature", "0", "--max-new-tokens", "6", "--quiet", "-i"]
    proc = subprocess.run([sys.executable, "-m", "simplegpt", "generate", *args], capture_output=True, timeout=120,
                          input=stdin.encode("utf-8", "surrogateescape"))
    out = [p + expected_text(char_checkpoint, p, max_new_tokens=6, temperature=0) for p in prompts]
    assert proc.stdout.decode() == "".join(o + "\n" for o in out)
    err = proc.stderr.decode().splitlines()
    assert len(err) == 2 and all(e.startswith("simplegpt generate: error: ") for e in err), err
    assert "'x'" in err[0] and "not UTF-8" in err[1]
    assert proc.returncode == 1  # a prompt failed, as `cat a missing b` says


def read_until(fd: int, proc: subprocess.Popen, wanted: bytes, seconds: float = 120) -> bytes:
    """What a pseudo-terminal's program writes, up to wanted (or until it ends)."""
    got, end = b"", time.monotonic() + seconds
    while wanted not in got and time.monotonic() < end:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the program closed the terminal
                break
            if not chunk:
                break
            got += chunk
        elif proc.poll() is not None:
            break
    return got


def test_interactive_session_on_a_terminal_has_a_banner_and_ends_ctrl_d_with_a_newline(char_checkpoint):
    """A real pseudo-terminal: the banner names the model (run-best) and how to quit, prompts show
    >>> and ..., and after Ctrl-D the shell's prompt starts a line of its own."""
    import pty

    master, slave = pty.openpty()
    args = ["--checkpoint", str(char_checkpoint), "--temperature", "0", "--max-new-tokens", "4", "--quiet", "-i"]
    proc = subprocess.Popen([sys.executable, "-m", "simplegpt", "generate", *args], stdin=slave, stdout=slave,
                            stderr=slave, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    os.close(slave)
    try:
        banner = read_until(master, proc, b">>> ").decode()
        assert banner.startswith("simplegpt generate: run-best (") and banner.count("\n") == 1, banner
        assert "Ctrl-D or /quit ends" in banner and '"""' in banner
        os.write(master, b"ab\\\n")
        assert read_until(master, proc, b"... ").endswith(b"... ")
        os.write(master, b"cd\n")
        text = expected_text(char_checkpoint, "ab\ncd", max_new_tokens=4, temperature=0)
        # the terminal's echo of the typed line, then only the new text: the prompt is on the screen (issue 27)
        assert read_until(master, proc, b">>> ") == f"cd\n{text}\n>>> ".replace("\n", "\r\n").encode()
        os.write(master, b"\x04")  # Ctrl-D at the >>> prompt
        assert proc.wait(timeout=60) == 0
        assert read_until(master, proc, b"\n", seconds=5) == b"\r\n"
    finally:
        proc.kill()
        os.close(master)


def test_prompt_file_byte_order_mark_is_not_text(checkpoint, tmp_path):
    """A UTF-8 byte-order mark (Windows editors write one) is not part of the prompt, as in corpora."""
    f = tmp_path / "prompt.txt"
    f.write_bytes(b"\xef\xbb\xbfhello")
    proc = cli("--checkpoint", str(checkpoint), "--prompt-file", str(f), "--temperature", "0",
               "--max-new-tokens", "10", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello" + expected_text(checkpoint, "hello", max_new_tokens=10, temperature=0) + "\n"
