"""Every command's --help says each option's default once: an option whose help says it in words does
not get argparse's '(default: None)' after it."""

import argparse
import re

from simplegpt.cli import build_parser


def test_no_option_says_its_default_twice():
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(commands.choices) > 10
    for name, command in commands.choices.items():
        text = re.sub(r"\s+", " ", command.format_help())
        assert not re.search(r"\(default:[^()]*(\([^()]*\)[^()]*)*\) \(default:", text), name
    export = re.sub(r"\s+", " ", commands.choices["export-gguf"].format_help())
    assert "(default: for models of 256 MB of f32 weights or more)" in export and "(default: None)" not in export


def test_import_gguf_names_its_output_as_its_help_speaks_of_it():
    [commands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    text = commands.choices["import-gguf"].format_help()
    assert "FILE.gguf OUT" in text and "replace OUT" in text
