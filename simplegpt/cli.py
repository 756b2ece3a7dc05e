"""The `simplegpt` command: a thin layer that parses arguments and calls the library.

Each subcommand lives in simplegpt/commands/<name>.py and defines HELP, add_arguments(parser)
and run(args) -> exit code. The project's own errors (simplegpt.errors) become one line on stderr
and their exit code (1, or 2 for usage); any other exception is a bug: its traceback, a request to
report it, and exit 70 (EX_SOFTWARE, sysexits.h's "internal software error").
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from . import __version__
from .errors import SimpleGPTError

EXIT_BUG = 70  # sysexits.h EX_SOFTWARE: apart from 1 and 2, so scripts can tell a bug from bad input

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
    "inspect": "inspect",
    "report": "report",
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
    except SimpleGPTError as e:
        print(f"simplegpt {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # The reader of stdout left (`simplegpt generate ... | head`): nothing is wrong, nothing more to say.
        # Python would complain once more while flushing stdout at exit, so stdout goes to devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception:
        traceback.print_exc()
        print(f"simplegpt {args.command}: this is a bug in simplegpt, not in what you asked for. Please report it "
              "on the project's issue tracker, with the command you ran and the traceback above.", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
