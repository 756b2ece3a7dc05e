"""The `simplegpt` command: a thin layer that parses arguments and calls the library.

Each subcommand lives in simplegpt/commands/<name>.py and defines HELP, add_arguments(parser)
and run(args) -> exit code. Options that several commands share are defined here, once:
add_checkpoint_argument (CHECKPOINT or --checkpoint), add_output_arguments (OUT and --overwrite),
and add_engine_arguments with load_engine (--quantize, --compile, --device, --threads and the
Engine they load, for generate and serve).

The project's own errors (simplegpt.errors) become one line on stderr and their exit code (1, or 2
for usage); any other exception is a bug: its traceback, a request to report it, and exit 70
(EX_SOFTWARE, sysexits.h's "internal software error").
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import os
import re
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, NoReturn

from . import __version__
from .console import output_cannot_fail, say
from .errors import CheckpointError, MissingDependencyError, OptionError, SimpleGPTError
from .files import BEST, LAST

if TYPE_CHECKING:
    from .generation.engine import Engine

DISTRIBUTION = "simplegpt-toolkit"  # what pip installs (pyproject.toml's project name); imports stay simplegpt
EXIT_BUG = 70  # sysexits.h EX_SOFTWARE: apart from 1 and 2, so scripts can tell a bug from bad input
# Commands whose output is only a log of work saved on disk: a reader that leaves (`| tee` killed by
# the same Ctrl-C) must not stop that work or change its exit code. Others stop when their output,
# which is their product, has no reader (`generate ... | head`).
OUTPUT_IS_A_LOG = {"train"}

# Subcommand name -> module under simplegpt.commands, in the order --help lists them.
COMMANDS = {
    "prepare": "prepare",
    "train": "train",
    "generate": "generate",
    "chat": "chat",
    "eval": "eval",
    "serve": "serve",
    "import-hf": "import_hf",
    "export-hf": "export_hf",
    "export-gguf": "export_gguf",
    "import-gguf": "import_gguf",
    "consolidate": "consolidate",
    "info": "info",
    "inspect": "inspect",
    "report": "report",
}


SPELLINGS = "Options take dashes or underscores: --max-new-tokens and --max_new_tokens are one option."


def _key(option: str) -> str:
    """An option's name whatever its spelling: --max_new_tokens and --max-new-tokens -> max-new-tokens."""
    return option.lstrip("-").replace("_", "-")



# How long a torchrun rank other than 0 waits before it exits on an error every rank meets, which rank 0
# alone reports: torchrun ends every rank as soon as one exits with an error, so a rank that left at
# once could kill rank 0 before its line was out. Rank 0's exit ends the wait (torchrun stops the rest).
QUIET_RANK_WAIT_S = 15.0


def let_rank_0_speak() -> None:
    """Wait (QUIET_RANK_WAIT_S) for rank 0 to report the error this rank keeps quiet about; see above."""
    time.sleep(QUIET_RANK_WAIT_S)

class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (what is wrong, where to look) and exit status 2.

    Every long option of every command takes both spellings (--max-new-tokens, --max_new_tokens),
    and an unknown option names the closest valid one and the command's own --help. Options are not
    abbreviated: `--max_iter` is a mistake to point out, not a run of `train --max-iters`, and a new
    option cannot change what an old command line means.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        # under torchrun every rank parses the same command line: rank 0 alone says what is wrong
        other_rank = all(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) and os.environ["RANK"] != "0"
        if other_rank:
            let_rank_0_speak()
        self.exit(2, None if other_rank else f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        if self._subparsers is not None:
            self._check_command(args)
        if self._subparsers is None:  # a command's own parser: every option in args is one of its own
            end = args.index("--") if "--" in args else len(args)  # after "--" come only values
            args = [self._respell(a) for a in args[:end]] + args[end:]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and extras[0].startswith("-"):
            self._unknown_option(extras[0].partition("=")[0])
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        if hasattr(namespace, _CHECKPOINT_SLOT):
            self._one_checkpoint(namespace)
        return namespace, extras

    def _one_checkpoint(self, namespace: argparse.Namespace) -> None:
        """namespace.checkpoint from CHECKPOINT or --checkpoint (add_checkpoint_argument); exits 2 when
        neither or two different ones are given."""
        positional, then, unless = getattr(namespace, _CHECKPOINT_SLOT)
        delattr(namespace, _CHECKPOINT_SLOT)
        option = getattr(namespace, "checkpoint", None)
        if positional is not None and option is not None and positional != option:
            if then is not None and getattr(namespace, then, None) is None:
                setattr(namespace, then, positional)  # `--checkpoint SRC DST`: the word is the next argument
                positional = None
            else:
                self.error(f"two checkpoints: {positional} and --checkpoint {option}; give one")
        if positional is None and option is None and not (unless and getattr(namespace, unless)):
            alternative = f" or --{unless.replace('_', '-')}" if unless else ""
            self.error(f"the following arguments are required: CHECKPOINT (or --checkpoint CHECKPOINT){alternative}")
        namespace.checkpoint = option if option is not None else positional

    def _check_command(self, args: list[str]) -> None:
        """Exits 2 when the first word that is not an option names no command, saying the closest one."""
        word = next((a for a in args if not a.startswith("-")), None)
        commands = self._subparsers._group_actions[0].choices
        if word is None or word in commands:
            return
        close = difflib.get_close_matches(word, commands, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        self.error(f"unknown command '{word}'; {hint}the commands are {', '.join(commands)}")

    def _respell(self, arg: str) -> str:
        """arg with its option named as this parser spells it (--max_new_tokens=5 -> --max-new-tokens=5).
        Runs before argparse, so an unknown option is reported before any missing required one."""
        if not arg.startswith("-") or arg in ("-", "--") or " " in arg or self._negative_number_matcher.match(arg):
            return arg  # what argparse takes for a value
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg[:2], "", arg[2:])
        options = self._option_string_actions
        if name in options:
            return arg
        spelled = {_key(o): o for o in options if o.startswith("--")}
        if name.startswith("--") and _key(name) in spelled:
            return spelled[_key(name)] + eq + value
        self._unknown_option(name)

    def _unknown_option(self, name: str) -> NoReturn:
        """Exits 2 naming the option, the closest valid one (if any is close) and this command's --help."""
        spelled = {_key(o): o for o in self._option_string_actions if o.startswith("--")}
        spelled.update({_key(o): o for o in self._option_string_actions if o.startswith("--") and "_" not in o})
        close = [k for k in spelled if k.startswith(_key(name))] or difflib.get_close_matches(_key(name), spelled, n=1)
        names = " or ".join(spelled[k] for k in sorted(close)[:3])
        # argparse's own words for it, which scripts and tests may look for, and the closest options
        self.error(f"unrecognized arguments: {name}" + (f"; did you mean {names}?" if names else ""))


# Where a command parser keeps the positional CHECKPOINT until it is reconciled with --checkpoint.
_CHECKPOINT_SLOT = "_checkpoint_positional"


class _PositionalCheckpoint(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, _CHECKPOINT_SLOT, (values, *getattr(namespace, _CHECKPOINT_SLOT)[1:]))


def add_checkpoint_argument(p: argparse.ArgumentParser, help: str, then: str | None = None,
                            unless: str | None = None) -> None:
    """The checkpoint a command reads, as its first positional argument or --checkpoint, whichever the
    user writes (args.checkpoint either way; one of them must be given, unless the flag whose dest is
    `unless` is set, which leaves args.checkpoint None). then: the dest of the optional positional after
    it, which `--checkpoint X Y` fills with Y."""
    p.set_defaults(**{_CHECKPOINT_SLOT: (None, then, unless)})
    p.add_argument("checkpoint_positional", metavar="CHECKPOINT", nargs="?", default=argparse.SUPPRESS,
                   action=_PositionalCheckpoint, help=f"{help} (or give it as --checkpoint CHECKPOINT)")
    p.add_argument("--checkpoint", metavar="CHECKPOINT", default=argparse.SUPPRESS, help="the same as CHECKPOINT")


def add_output_arguments(p: argparse.ArgumentParser, help: str, metavar: str = "OUT", optional: bool = False) -> None:
    """The folder a command writes (args.out; with optional=True it may be left out, and args then has
    no `out`) and --overwrite (args.overwrite), which lets the command replace one that is not empty."""
    left_out = {"nargs": "?", "default": argparse.SUPPRESS} if optional else {}
    p.add_argument("out", metavar=metavar, help=help, **left_out)
    p.add_argument("--overwrite", action="store_true", help=f"replace what {metavar} already holds (otherwise refuse)")


def model_name(checkpoint: str) -> str:
    """The name a checkpoint is shown and served under: out/run/best -> run-best (which run, and which
    of its checkpoints); any other folder: its name."""
    folder = Path(checkpoint).resolve()
    return f"{folder.parent.name}-{folder.name}" if folder.name in (BEST, LAST) else folder.name


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float, per: str) -> None:
    """Adds --max-new-tokens (most tokens `per` reply or sample, for --help), --temperature, --top-k and
    --top-p, the sampling options generate and chat share (SamplingParams' fields)."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"most tokens to generate {per}")
    p.add_argument("--temperature", type=float, default=temperature,
                   help="sampling temperature; 0 (or below 1e-5) = greedy decoding")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens only; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: the smallest set of tokens with total probability >= p; 1 = off")


def add_engine_arguments(p: argparse.ArgumentParser, long_running: str) -> None:
    """Adds --quantize, --compile, --device and --threads to p; long_running: where compiling pays off,
    for --help."""
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: int8 weights for the linear layers (CPU; ~4x less memory read per token)")
    p.add_argument("--compile", action="store_true",
                   help="run each decode step as one torch.compile'd function over a static KV cache (CUDA graphs "
                        "on a GPU), in place of the native CPU kernels; helps on GPUs and in long-running "
                        f"processes ({long_running}), since the first tokens of each batch size wait for the "
                        "compilation (seconds to a minute); needs a C++ compiler on the CPU; not with --quantize int8")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads for decoding; 0 (the default): OMP_NUM_THREADS where set, else the cores other "
                        "processes leave idle, measured for 0.2 s at start (threads beyond the idle cores wait for "
                        "the busy ones and slow decoding down many times)")


def check_engine_arguments(args: argparse.Namespace) -> None:
    """Raises OptionError for engine options that cannot go together; cheap, so call it before loading."""
    if args.threads < 0:
        raise OptionError(f"--threads must be 0 (the idle cores) or a number of threads, got {args.threads}")
    if args.compile and args.quantize == "int8":
        raise OptionError("--compile does not work with --quantize int8 (its int8 kernels do not compile): "
                          "choose one")


def load_engine(args: argparse.Namespace, quiet: bool = True) -> Engine:
    """The Engine that loads and owns args.checkpoint (Engine.from_checkpoint) with add_engine_arguments'
    options, the int8 sizes on stderr unless quiet; on the CPU it sets torch's threads (--threads, else
    decode_threads()'s choice). Raises CheckpointError for a checkpoint that
    cannot be loaded or has no tokenizer, DeviceError for a device this machine does not have,
    OptionError for int8 off the CPU."""
    import torch

    from .accel.cpu.threads import decode_threads
    from .devices import resolve_device
    from .generation.engine import Engine

    device = resolve_device("cpu" if args.device == "auto" and args.quantize == "int8" else args.device)
    if args.quantize == "int8" and device.type != "cpu":
        raise OptionError(f"--quantize int8 runs on the CPU only: use --device cpu (or drop --quantize on {device})")
    if device.type == "cpu":
        torch.set_num_threads(decode_threads(args.threads))
    engine = Engine.from_checkpoint(args.checkpoint, device=device, quantize=args.quantize, compile=args.compile)
    if engine.tokenizer is None:
        raise CheckpointError(f"{args.checkpoint} has no tokenizer/ directory: cannot turn text into tokens")
    if engine.quant_report is not None and not quiet:
        report = engine.quant_report
        print(f"[int8: linear weights {report.fp32_bytes / 2**20:.0f} MiB -> {report.int8_bytes / 2**20:.0f} MiB]",
              file=sys.stderr)
    return engine


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown in --help, except for options that must be given (a required option has none),
    options without a default (None: "(default: None)" tells a user nothing) and options whose help
    says its default in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _command_module(name: str, module_name: str) -> ModuleType:
    """The module of command `name`. Raises MissingDependencyError naming the package and how to install
    it when a package the module imports is missing or broken; any other failure to import it (a file
    of simplegpt itself missing, a bug) propagates with its traceback and a note naming the command.
    Every command is listed, so none may be skipped: a missing command would look like a typo."""
    try:
        return importlib.import_module(f"simplegpt.commands.{module_name}")
    except ImportError as e:
        package = (e.name or "").partition(".")[0]
        if package and package != __package__:
            raise MissingDependencyError(f"the '{name}' command needs the package '{package}', which cannot be "
                                         f"imported ({e}): {install_hint(package)}") from e
        e.add_note(f"simplegpt: the '{name}' command (simplegpt/commands/{module_name}.py) cannot be loaded; "
                   "if simplegpt was installed as released, reinstall it first")
        raise


def install_hint(package: str) -> str:
    """How to install the import package `package`: the extra of this distribution that lists it
    (pip install 'simplegpt-toolkit[serve]' for fastapi), read from the installed metadata, else
    the package alone."""
    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "_", name).lower()

    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        requires = []
    for requirement in requires:
        m = re.match(r"\s*([\w.-]+).*;.*\bextra\s*==\s*[\"']([\w-]+)[\"']", requirement)
        if m and canonical(m[1]) == canonical(package) and m[2] != "dev":
            return f"pip install '{DISTRIBUTION}[{m[2]}]'"
    return f"pip install {package}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="simplegpt",
        description="Train, generate with, evaluate and serve small GPT models.",
        epilog="Start with 'simplegpt train': a character-level Shakespeare model in a few minutes on a CPU (it "
               "writes the prepared text to data/ and the run to out/ under the current folder). "
               f"Run 'simplegpt COMMAND --help' for the options of a command. {SPELLINGS}",
    )
    parser.add_argument("--version", action="version", version=f"simplegpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        module = _command_module(name, module_name)
        description = getattr(module, "DESCRIPTION", module.HELP)  # a sentence: HELP is a list item
        p = sub.add_parser(name, help=module.HELP, description=description[:1].upper() + description[1:],
                           epilog=SPELLINGS, formatter_class=_HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
    except MissingDependencyError as e:
        say(f"simplegpt: error: {e}")
        return e.exit_code
    except Exception:
        return _bug("simplegpt")
    if not argv:
        # what the tool does and its commands; training (which writes data/ and out/) is asked for by name
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        with output_cannot_fail() if args.command in OUTPUT_IS_A_LOG else contextlib.nullcontext():
            return int(args._run(args) or 0)
    except KeyboardInterrupt:
        say("simplegpt: interrupted")
        return 130
    except SimpleGPTError as e:
        say(f"simplegpt {args.command}: error: {e}")
        return e.exit_code
    except BrokenPipeError:
        # The reader of stdout left (`simplegpt generate ... | head`): nothing is wrong, nothing more to say.
        # Python would complain once more while flushing stdout at exit, so stdout goes to devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception:
        return _bug(f"simplegpt {args.command}")


def _bug(who: str) -> int:
    """The traceback of the exception being handled and a request to report it; returns EXIT_BUG."""
    with contextlib.suppress(OSError, ValueError):
        traceback.print_exc()
    say(f"{who}: this is a bug in simplegpt, not in what you asked for. Please report it on the project's issue "
        "tracker, with the command you ran and the traceback above.")
    return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
