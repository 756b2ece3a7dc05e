"""The `simplegpt` command's error contract: simplegpt's own errors are one line and exit 1 (2 for
usage), through real `python -m simplegpt` processes; any other exception is a bug and keeps its
traceback (exit 70)."""

import argparse
import ast
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, make_tiny_gpt
from simplegpt import get_tokenizer, save_checkpoint
from simplegpt.checkpoint import CHECKSUMS
from simplegpt.cli import EXIT_BUG, build_parser, main

BUG_REPORT = "Please report it on the project's issue tracker"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tok = get_tokenizer("byte")
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", make_tiny_gpt(vocab_size=tok.vocab_size), tok)


def simplegpt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simplegpt", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def damaged_tokenizer(checkpoint: Path, root: Path, checksums: bool) -> Path:
    """A copy of the checkpoint with its tokenizer.json garbled; checksums=False: as saved before
    config.json recorded the files' sha256, so only reading the tokenizer finds the damage."""
    bad = root / "bad-tokenizer"
    bad.mkdir()
    for f in checkpoint.rglob("*"):
        if f.is_file():
            (bad / f.relative_to(checkpoint)).parent.mkdir(parents=True, exist_ok=True)
            (bad / f.relative_to(checkpoint)).write_bytes(f.read_bytes())
    (bad / "tokenizer" / "tokenizer.json").write_text("{not json")
    if not checksums:
        doc = json.loads((bad / "config.json").read_text())
        doc.pop(CHECKSUMS, None)
        (bad / "config.json").write_text(json.dumps(doc))
    return bad


@pytest.mark.parametrize("args, words", [
    (["generate", "--prompt", "x", "--max-new-tokens", "-3"], "max_new_tokens must be a positive integer"),
    (["generate", "--prompt", "x", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["generate", "--prompt", "x", "--stop", ""], "stop strings must be non-empty"),
    (["generate", "--prompt", "x", "--device", "cuda:7"], "cuda:7"),
    (["generate", "--prompt-file", "."], "--prompt-file ."),
    (["serve", "--max-tokens", "-1"], "--max-tokens must be a positive integer"),
    (["serve", "--port", "0", "--host", "nonsense.invalid"], "cannot listen on nonsense.invalid"),
    (["eval", "--data", "{corpus}", "--context", "999"], "--context 999 exceeds the model's n_positions (32)"),
    (["eval", "--data", "{corpus}", "--device", "nonsense"], "is not a device"),
    (["info", "{bad}"], "tokenizer.json is truncated or corrupted"),
    (["info", "{old}"], "tokenizer is damaged"),
    (["export-hf", "CK", "{corpus}"], "exists and is not a directory"),
])
def test_bad_input_is_one_line_and_exit_1(checkpoint, tmp_path, args, words):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 4)
    bad = damaged_tokenizer(checkpoint, tmp_path, checksums="{bad}" in args) if args[0] == "info" else None
    args = [a.format(corpus=corpus, bad=bad, old=bad) for a in args]
    if args[0] in ("generate", "serve", "eval"):
        args[1:1] = ["--checkpoint", str(checkpoint)]
    args = [str(checkpoint) if a == "CK" else a for a in args]
    proc = simplegpt(*args)
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"simplegpt {args[0]}: error: ") and words in line, line


def test_usage_errors_exit_2(checkpoint, capsys, monkeypatch):
    proc = simplegpt("generate", "--checkpoint", str(checkpoint), "--max-new-tokens", "many")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "invalid int value: 'many'" in proc.stderr

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())  # no --prompt, nothing piped in: the command says nothing to do
    assert main(["generate", "--checkpoint", str(checkpoint)]) == 2
    assert capsys.readouterr().err == ("simplegpt generate: error: no prompt: give --prompt TEXT, --prompt-file PATH, "
                                       "pipe it in, or use -i\n")


def test_a_missing_extra_is_one_line_naming_it(checkpoint, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # makes `import uvicorn` fail
    assert main(["serve", "--checkpoint", str(checkpoint)]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("simplegpt serve: error: simplegpt serve needs uvicorn: pip install ") and "[serve]" in line


@pytest.mark.parametrize("error", [ValueError("a bug's ValueError"), RuntimeError("a bug"), KeyError("field")])
def test_a_bug_keeps_its_traceback_and_asks_for_a_report(checkpoint, capsys, monkeypatch, error):
    """An exception that is not simplegpt's own, a ValueError included, is not dressed as bad input."""
    import simplegpt.commands.info as info

    def run(args):
        raise error

    monkeypatch.setattr(info, "run", run)
    assert main(["info", str(checkpoint)]) == EXIT_BUG == 70
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in run\n    raise error" in err
    assert f"{type(error).__name__}: {error}" in err
    assert err.strip().splitlines()[-1].startswith("simplegpt info: this is a bug in simplegpt") and BUG_REPORT in err


def test_a_bug_in_a_real_process_exits_70_with_its_traceback(checkpoint):
    """The same through `python -m simplegpt`'s own entry point, as a shell sees it."""
    code = ("import runpy, sys, simplegpt.commands.info as info\n"
            "def run(args):\n"
            "    return {}['a key the command forgot']\n"
            "info.run = run\n"
            f"sys.argv = ['simplegpt', 'info', {str(checkpoint)!r}]\n"
            "runpy.run_module('simplegpt', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 70, proc.stderr
    assert "Traceback" in proc.stderr and "KeyError: 'a key the command forgot'" in proc.stderr
    assert BUG_REPORT in proc.stderr


def test_a_reader_that_leaves_is_not_a_bug(checkpoint):
    """`simplegpt generate ... | head -c1`: the pipe closes under the output; no traceback, no bug report."""
    proc = subprocess.Popen([sys.executable, "-m", "simplegpt", "generate", "--checkpoint", str(checkpoint),
                             "--prompt", "x", "--max-new-tokens", "30", "--stream", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the model is loaded: the first write finds the pipe closed
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert err == "", err


@pytest.mark.parametrize("source", ["stdin", "argv"])
def test_a_prompt_that_is_not_utf8_is_one_line(checkpoint, source):
    """Python reads such bytes as lone surrogates, which no tokenizer encodes: bad input, not a bug."""
    args = [sys.executable, "-m", "simplegpt", "generate", "--checkpoint", str(checkpoint), "--max-new-tokens", "3"]
    if source == "argv":
        args += ["--prompt", os.fsdecode(b"caf\xe9")]
    proc = subprocess.run(args, input=b"caf\xe9\n", capture_output=True, timeout=120)
    where = "standard input" if source == "stdin" else "--prompt"
    assert proc.returncode == 1 and proc.stderr.decode() == f"simplegpt generate: error: {where} is not UTF-8 text\n"


def copy_of_the_package(root: Path) -> Path:
    """simplegpt as an install of it would hold it, in root/simplegpt, to break on purpose."""
    shutil.copytree(ROOT / "simplegpt", root / "simplegpt", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def simplegpt_from(path: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m simplegpt ARGS` with the package and what it imports found first on `path` (and run from
    the first folder of it, since -m looks in the current folder before PYTHONPATH)."""
    return subprocess.run([sys.executable, "-m", "simplegpt", *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, cwd=path.split(os.pathsep)[0],
                          env={**os.environ, "PYTHONPATH": path, "PYTHONIOENCODING": "utf-8"})


def test_help_fails_loudly_when_a_commands_module_is_missing(tmp_path):
    """An install that lost commands/report.py listed the other commands and exited 0, as if there were no
    'report' command: now --help fails with the import's traceback, naming the module and the command."""
    root = copy_of_the_package(tmp_path)
    (root / "simplegpt" / "commands" / "report.py").unlink()
    proc = simplegpt_from(str(root), "--help")
    assert proc.returncode == EXIT_BUG, proc.stdout
    assert "Traceback" in proc.stderr and "No module named 'simplegpt.commands.report'" in proc.stderr
    assert "the 'report' command (simplegpt/commands/report.py) cannot be loaded" in proc.stderr
    assert proc.stdout == ""


def test_help_names_the_package_a_command_cannot_import(tmp_path):
    """A command whose module imports a package that is broken (an install that lost one of its files) is one
    line naming the package and the extra that installs it, not a traceback and not a missing command."""
    root = copy_of_the_package(tmp_path / "tree")
    serve = root / "simplegpt" / "commands" / "serve.py"
    serve.write_text(serve.read_text(encoding="utf-8").replace(
        "from __future__ import annotations\n", "from __future__ import annotations\n\nimport fastapi  # noqa: F401\n", 1),
        encoding="utf-8")
    broken = tmp_path / "site" / "fastapi"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("from ._speedups import encoders  # noqa: F401\n", encoding="utf-8")
    proc = simplegpt_from(os.pathsep.join([str(tmp_path / "site"), str(root)]), "--help")
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == ("simplegpt: error: the 'serve' command needs the package 'fastapi', which cannot be "
                           "imported (No module named 'fastapi._speedups'): pip install 'simplegpt-toolkit[serve]'\n")


def test_commands_never_import_each_other():
    """Options two commands share live in the library (cli.py), not in one of them."""
    commands = sorted((ROOT / "simplegpt" / "commands").glob("*.py"))
    names = {p.stem for p in commands} - {"__init__"}
    assert {"generate", "serve"} <= names
    for path in commands:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                sibling = node.level == 1 or (node.module or "").startswith("simplegpt.commands")
                assert not sibling, f"{path.name} imports {'.' * node.level}{node.module or ''}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("simplegpt.commands") for a in node.names), path.name


def respelled(option: str) -> str:
    """--max-new-tokens <-> --max_new_tokens."""
    name = option[2:]
    return "--" + (name.replace("_", "-") if "_" in name else name.replace("-", "_"))


def parse(argv: list[str], capsys) -> tuple[object, str]:
    """What the CLI's parser makes of argv: its namespace (without the command function), or its exit and error."""
    try:
        args = vars(build_parser().parse_args(argv))
        args.pop("_run", None)
        return args, ""
    except SystemExit as e:
        return e.code, capsys.readouterr().err


def test_every_option_of_every_command_takes_both_spellings(capsys):
    """Issue 16: train took --max_iters and --max-iters, generate only --max-new-tokens."""
    subcommands = build_parser()._subparsers._group_actions[0].choices
    checked = 0
    for command, sub in subcommands.items():
        required = []
        for action in sub._actions:
            if not action.option_strings:
                required.append("X")
            elif action.required:
                required += [action.option_strings[-1], "X"]
        for action in sub._actions:
            if action.nargs == 0 and isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            value = [] if action.nargs == 0 else [str(action.choices[0]) if action.choices else "1"]
            for option in action.option_strings:
                if not option.startswith("--") or option[2:].replace("_", "-") == option[2:].replace("_", ""):
                    continue  # one-word options have one spelling
                if sub._option_string_actions.get(respelled(option), action) is not action:
                    continue  # train's --init-from and --init_from: two options the command declares itself
                want = parse([command, *required, option, *value], capsys)
                assert parse([command, *required, respelled(option), *value], capsys) == want, (command, option)
                checked += 1
    assert checked > 20


def test_an_unknown_option_names_the_closest_and_the_commands_help(checkpoint):
    """One line, exit 2, before any complaint about a missing --checkpoint; no abbreviations."""
    proc = simplegpt("generate", "--max_new_token", "5")
    assert proc.returncode == 2 and proc.stderr == (
        "simplegpt generate: error: unrecognized arguments: --max_new_token; did you mean --max-new-tokens? "
        "(see 'simplegpt generate --help')\n")
    proc = simplegpt("train", "--max_iter", "3")  # argparse would have run `--max-iters 3`
    assert proc.returncode == 2 and proc.stderr == (
        "simplegpt train: error: unrecognized arguments: --max_iter; did you mean --max-iters? "
        "(see 'simplegpt train --help')\n")
    proc = simplegpt("generate", "--checkpoint", str(checkpoint), "--top", "0.5")
    assert proc.returncode == 2 and "unrecognized arguments: --top; did you mean --top-k or --top-p?" in proc.stderr
    proc = simplegpt("serve", "--checkpoint", str(checkpoint), "--nonsense")
    assert proc.returncode == 2 and proc.stderr == ("simplegpt serve: error: unrecognized arguments: --nonsense "
                                                    "(see 'simplegpt serve --help')\n")


def test_underscores_in_a_real_generate_run(checkpoint):
    """The spelling of train's settings works for generate: the same text as with dashes."""
    args = ["--checkpoint", str(checkpoint), "--prompt", "x", "--temperature", "0", "--quiet"]
    dashes = simplegpt("generate", *args, "--max-new-tokens", "7", "--no-echo")
    underscores = simplegpt("generate", *args, "--max_new_tokens=7", "--no_echo")
    assert dashes.returncode == underscores.returncode == 0, underscores.stderr
    assert underscores.stdout == dashes.stdout and len(dashes.stdout) == 8


def test_help_shows_defaults_but_none_for_a_required_option():
    """Every command's --help shows its defaults; an option that must be given shows none ("(default:
    None)" beside it read as if leaving it out were fine)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    required = 0
    for command, parser in sub.choices.items():
        assert parser.description[:1].isupper(), command  # a sentence, as every command's page begins
        formatter = parser._get_formatter()
        for action in parser._actions:
            text = formatter._get_help_string(action) or ""
            if action.required and action.option_strings:
                required += 1
                assert "%(default)" not in text, (command, action.option_strings)
            elif action.help and action.default not in (None, argparse.SUPPRESS) and action.option_strings:
                assert "%(default)" in text or "default" in action.help, (command, action.option_strings)
        # an option without a default says nothing of one ("(default: None)" is noise: chat's --seed had it)
        assert "(default: None)" not in parser.format_help(), command
    assert required >= 2  # eval's --data and inspect's --text at least (CHECKPOINT may also be positional: issue 27)
