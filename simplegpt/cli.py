"""The `simplegpt` command: a thin layer that parses arguments and calls the library.

Each subcommand lives in simplegpt/commands/<name>.py and defines HELP, add_arguments(parser)
and run(args) -> exit code. Errors meant for the user become one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import SimpleGPTError

# Subcommand name -> module under simplegpt.commands, in the order --help lists them.
COMMANDS = {
    "prepare": "prepare",
    "train": "train",
    "generate": "generate",
    "eval": "eval",
    "serve": "serve",
    "import-hf": "import_hf",
    "export-hf": "export_hf",
    "info": "info",
}


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (what is wrong, where to look) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="simplegpt",
        description="Train, generate with, evaluate and serve small GPT models.",
        epilog="Run 'simplegpt COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"simplegpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"simplegpt.commands.{module_name}")
        except ModuleNotFoundError as e:
            if e.name == f"simplegpt.commands.{module_name}":
                continue  # command not built yet
            raise
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        argv = ["train"] if "train" in parser._subparsers._group_actions[0].choices else ["--help"]
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("simplegpt: interrupted", file=sys.stderr)
        return 130
    except (SimpleGPTError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            PermissionError, ImportError) as e:
        print(f"simplegpt {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
