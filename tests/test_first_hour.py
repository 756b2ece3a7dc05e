"""Issue 27: a new user's second hour. Eval on text with new characters, short runs that reach their
learning rate, commands that take their checkpoint alike, files anyone may read, corpora that hold
no text, and what a terminal shows: each through the real `simplegpt` command."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, make_tiny_gpt
from simplegpt import get_tokenizer, save_checkpoint

TEXT = "to be or not to be, that is the question; whether tis nobler in the mind to suffer\n" * 40


def simplegpt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "simplegpt", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, stdin=subprocess.DEVNULL, env=env)


@pytest.fixture(scope="module")
def char_checkpoint(tmp_path_factory) -> Path:
    """A tiny model whose character vocabulary is TEXT's: lowercase, no capitals, no apostrophe."""
    tok = get_tokenizer("char", TEXT)
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "char", make_tiny_gpt(vocab_size=tok.vocab_size), tok)


def test_every_file_the_commands_write_is_readable_by_all_under_umask_022(tmp_path, monkeypatch):
    """Item 7: export-hf wrote model.safetensors 0600 (checkpoints had been fixed, the export not)."""
    from simplegpt.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text(TEXT)
    steps = [  # train prepares data/, writes out/ (checkpoints, metrics, loss.png, report.html)
        ["train", "--data", "notes.txt", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16",
         "--batch_size", "2", "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1", "--sample_tokens", "4",
         "--num_threads", "1", "--tensorboard", "false", "--out_dir", "out/notes", "--quiet"],
        ["export-hf", "out/notes/best", "hf"],
        ["inspect", "out/notes/best", "--text", "to be", "--out", "pictures", "--html"],
    ]
    umask = os.umask(0o022)
    try:
        for args in steps:
            assert main(args) == 0, args
    finally:
        os.umask(umask)
    private = [f"{p.relative_to(tmp_path)} {stat.filemode(p.stat().st_mode)}" for p in tmp_path.rglob("*")
               if not p.is_symlink() and p.stat().st_mode & 0o777 != (0o755 if p.is_dir() else 0o644)]
    assert not private


def test_bare_simplegpt_prints_help_and_trains_nothing(tmp_path, monkeypatch, capsys):
    """Item 4: `simplegpt` alone started a 4-minute training run that wrote data/ and out/."""
    import simplegpt.commands.train as train_command
    from simplegpt.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_command, "run", lambda args: pytest.fail("bare simplegpt started training"))
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: simplegpt") and "simplegpt train" in out and "data/" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("typed, meant", [("trian", "train"), ("genrate", "generate"), ("infoo", "info")])
def test_a_mistyped_command_suggests_the_closest(typed, meant, capsys):
    from simplegpt.cli import main

    with pytest.raises(SystemExit) as e:
        main([typed, "--max_iters", "3"])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and f"unknown command '{typed}'; did you mean '{meant}'?" in line


def test_every_command_takes_its_checkpoint_positionally_or_with_the_option(char_checkpoint, tmp_path, capsys):
    """Item 5: info took CHECKPOINT only, generate/eval/serve/inspect --checkpoint only."""
    from simplegpt.cli import build_parser

    ck = str(char_checkpoint)
    commands = {"info": [], "export-hf": ["OUT"], "consolidate": ["OUT"], "generate": ["--prompt", "x"],
                "eval": ["--data", "x.txt"], "serve": [], "inspect": ["--text", "x"]}
    for command, rest in commands.items():
        positional = vars(build_parser().parse_args([command, ck, *rest]))
        option = vars(build_parser().parse_args([command, "--checkpoint", ck, *rest]))
        assert positional == option and positional["checkpoint"] == ck, command
        assert "OUT" not in rest or option["out"] == "OUT", command
        missing = [command, *rest] if command != "consolidate" else [command]  # consolidate OUT: OUT is its SRC
        with pytest.raises(SystemExit):
            build_parser().parse_args(missing)
        assert "required: CHECKPOINT (or --checkpoint CHECKPOINT)" in capsys.readouterr().err
        for args in ([command, ck, "--checkpoint", "elsewhere", *rest],):
            with pytest.raises(SystemExit) as e:
                build_parser().parse_args(args)
            assert e.value.code == 2
            assert capsys.readouterr().err.startswith(f"simplegpt {command}: error: ")
    proc = simplegpt("info", "--checkpoint", ck)
    assert proc.returncode == 0 and "parameters" in proc.stdout, proc.stderr


def tiny_run(tmp_path: Path, text: str = TEXT, **overrides):
    """A tiny model trained on text through load_config, as `simplegpt train --data notes.txt ...` does."""
    from simplegpt.config import load_config
    from simplegpt.trainer import train

    (tmp_path / "notes.txt").write_text(text)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    settings = dict(data=str(tmp_path / "notes.txt"), data_dir=str(tmp_path / "data"), n_layer=1, n_head=2,
                    n_embd=16, block_size=16, batch_size=2, eval_iters=1, sample_tokens=0, log_interval=1,
                    num_threads=1, plot=False, tensorboard=False, out_dir=str(tmp_path / "run"))
    cfg = load_config(None, {**settings, **overrides})
    train(cfg, progress=False)
    return cfg


def test_a_short_run_reaches_its_learning_rate_and_decays(tmp_path):
    """Item 2: the config file's 50 warmup steps made `--max_iters 20 --lr 1e-4` all warmup (lr 2e-5 at
    step 10, 4e-5 at step 20)."""
    cfg = tiny_run(tmp_path, max_iters=20, lr=1e-4, eval_interval=20)
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "train"]
    assert len(lrs) == 20 and cfg.warmup_iters == 2
    assert max(lrs) == pytest.approx(1e-4) and lrs.index(max(lrs)) <= 2
    assert lrs[-1] == pytest.approx(cfg.min_lr) and cfg.min_lr < 2e-5 and lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)


def test_an_explicit_warmup_longer_than_the_run_is_kept_with_a_warning(tmp_path, capsys):
    cfg = tiny_run(tmp_path, max_iters=4, warmup_iters=50, eval_interval=4)
    assert cfg.warmup_iters == 50
    [line] = [line for line in capsys.readouterr().out.splitlines() if "warning: the warmup" in line]
    assert "warmup_iters = 50) is longer than the run's 4 steps: the learning rate never reaches" in line


NEW_TEXT = "Good morning, to be or not. Don't be.\n"  # capitals, an apostrophe and a full stop TEXT lacks


@pytest.mark.parametrize("command", ["eval", "generate", "inspect", "train"])
def test_a_character_the_model_never_saw_is_one_line_in_every_command(command, char_checkpoint, tmp_path):
    """Item 1: eval's was a traceback and exit 70 (ValueError from the tokenizer); the other commands that
    encode a user's text must answer it in one line too."""
    (tmp_path / "notes.txt").write_text(NEW_TEXT * 20)
    args = {"eval": ["--data", "notes.txt"], "generate": ["--prompt", NEW_TEXT], "inspect": ["--text", NEW_TEXT],
            "train": ["--init-from", str(char_checkpoint), "--data", "notes.txt", "--block_size", "8"]}[command]
    proc = simplegpt(command, *([str(char_checkpoint)] if command != "train" else []), *args, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    *_, line = proc.stderr.strip().splitlines()  # train says first what it loads
    assert line.startswith(f"simplegpt {command}: error: ") and "'G' (U+0047)" in line and "'\\''" not in line
    assert "rebuild the vocabulary" not in line
    if command == "eval":
        assert "--skip-unknown" in line
    if command == "train":  # item 3: the fine-tune's vocabulary cannot be rebuilt; what does work
        assert "--unknown_chars drop" in line and "without --init-from" in line
        assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_eval_skip_unknown_scores_the_rest_of_the_text_and_says_how_much_was_left_out(char_checkpoint, tmp_path):
    (tmp_path / "notes.txt").write_text(NEW_TEXT)
    known = "".join(c for c in NEW_TEXT if c in TEXT)
    (tmp_path / "known.txt").write_text(known)
    skipped = simplegpt("eval", str(char_checkpoint), "--data", "notes.txt", "--skip-unknown", "--json", cwd=tmp_path)
    assert skipped.returncode == 0, skipped.stderr
    [line] = skipped.stderr.strip().splitlines()
    n = len(NEW_TEXT) - len(known)
    assert f"left out {n} characters the model's vocabulary lacks" in line and "'G' x1" in line
    plain = simplegpt("eval", str(char_checkpoint), "--data", "known.txt", "--json", cwd=tmp_path)
    result, reference = json.loads(skipped.stdout), json.loads(plain.stdout)
    assert result.pop("dropped_characters") == n and reference.pop("dropped_characters") == 0
    assert {**result, "data": ""} == {**reference, "data": ""}


@pytest.mark.parametrize("policy", ["drop", " "])
def test_fine_tuning_on_new_characters_drops_or_replaces_them_when_asked(policy, char_checkpoint, tmp_path):
    """Item 3: a pretrained model's vocabulary is fixed: --unknown_chars drop or a stand-in character."""
    from simplegpt.data.shards import TokenShards
    from simplegpt.tokenizer import load_tokenizer

    cfg = tiny_run(tmp_path, init_from=str(char_checkpoint), data=None, unknown_chars=policy, block_size=8,
                   max_iters=2, eval_interval=2, text=NEW_TEXT * 20)
    data = Path(cfg.data_dir)
    tok = load_tokenizer(data / "tokenizer")
    stream = tok.decode(list(TokenShards(data, "train").arrays[0]) + list(TokenShards(data, "val").arrays[0]))
    want = "".join(c if c in TEXT else policy.replace("drop", "") for c in NEW_TEXT * 20)
    assert stream == want


def test_generate_interactive_on_a_terminal_shows_the_typed_prompt_once(char_checkpoint):
    """Item 10: on a terminal, `generate -i` printed the prompt after the terminal had echoed it as typed."""
    import pty
    import select
    import time

    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.Popen([sys.executable, "-m", "simplegpt", "generate", str(char_checkpoint), "-i",
                             "--max-new-tokens", "3", "--temperature", "0", "--quiet"],
                            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    seen, typed, deadline = b"", False, time.monotonic() + 120
    try:
        while seen.count(b">>> ") < 2 and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 4096)
            if b">>> " in seen and not typed:
                os.write(master, b"whether tis nobler\n")  # the terminal echoes it, as it does what anyone types
                typed = True
        os.write(master, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)
    assert seen.count(b">>> ") == 2, seen
    assert seen.count(b"whether tis nobler") == 1, seen


@pytest.mark.parametrize("tokenizer", ["char", "byte"])
def test_a_whitespace_only_corpus_is_refused_in_one_line_and_leaves_nothing(tokenizer, tmp_path):
    """Item 9: it was accepted (a character vocabulary of 3: space, newline, end-of-text)."""
    (tmp_path / "blank.txt").write_text("   \n\n\t  \n" * 50)
    proc = simplegpt("prepare", "blank.txt", "-t", tokenizer, "--quiet", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == "simplegpt prepare: error: corpus 'blank.txt' holds only whitespace (spaces, tabs, " \
                          "line breaks): no text to train on\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt"]


def test_a_run_on_a_file_too_small_to_train_on_leaves_no_data_or_out_folder(tmp_path, monkeypatch):
    """Item 9: the run failed ("the corpus is too small") after writing data/<name> (and an empty out/)."""
    from simplegpt.config import load_config
    from simplegpt.errors import DataError
    from simplegpt.trainer import train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text("hello there\n")
    with pytest.raises(DataError, match="the corpus is too small: its train split has 11 tokens"):
        train(load_config(None, {"data": "tiny.txt"}), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.txt"]
