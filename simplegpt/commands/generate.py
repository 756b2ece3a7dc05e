"""simplegpt generate: sample text from a checkpoint (once, streamed, or interactively)."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable

from ..cli import (add_checkpoint_argument, add_engine_arguments, add_sampling_arguments, check_engine_arguments,
                   load_engine, model_name)
from ..errors import DataError, FileAccessError, OptionError, SimpleGPTError, UsageError, file_access_errors

HELP = "generate text from a checkpoint"
DESCRIPTION = (
    "Generate text from a trained checkpoint with a KV-cached engine. The prompt comes from --prompt, "
    "--prompt-file or standard input; -i keeps the model loaded and reads prompts from standard input "
    "(one a line; a line ending in \\ goes on to the next, and a block between two \"\"\" lines is one prompt). "
    "An empty prompt starts from the end-of-text token (unconditional sampling). When prompt + output "
    "outgrow the model's window, the oldest quarter of the context is dropped and generation goes on. "
    "On x86-64 CPUs up to 16 samples at a time decode in simplegpt's native kernels, compiled on first use with "
    "the machine's C compiler (SIMPLEGPT_NATIVE=0 uses PyTorch's kernels instead)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(p, "checkpoint directory to load")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT",
                     help="the prompt; '-' reads it from standard input (also the default when input is piped)")
    src.add_argument("--prompt-file", metavar="PATH", help="read the prompt from this UTF-8 file")
    src.add_argument("-i", "--interactive", action="store_true",
                     help="read prompts from standard input, keeping the model loaded: one a line (empty lines "
                          "are skipped), a line ending in \\ goes on to the next, a block between two \"\"\" lines "
                          "is one prompt; a bad prompt is one error line and the session goes on (exit status 1 "
                          "at the end); EOF (Ctrl-D) or /quit ends")
    add_sampling_arguments(p, max_new_tokens=200, temperature=0.8, per="per sample")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than min-p times the most likely one; 0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide positive (multiply negative) logits of tokens already in the context; 1 = off")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for reproducible samples (sample i uses seed + i); none = different every run")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text is generated (not printed); repeat for several")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt, generated as one batch")
    p.add_argument("--stream", action="store_true",
                   help="print text as it is generated (several samples are then generated one after another)")
    p.add_argument("--no-echo", action="store_true",
                   help="print only the generated text, not the prompt (as -i does on a terminal, where the typed "
                        "prompt is on the screen already)")
    add_engine_arguments(p, "-i")
    p.add_argument("--quiet", action="store_true", help="don't print the per-sample summary on stderr")


def run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        # Warnings (e.g. a prompt cut to the model's window) as one plain line on stderr, like errors.
        warnings.showwarning = lambda message, *_, **__: print(f"simplegpt generate: warning: {message}",
                                                                file=sys.stderr)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..generation.sampling import SamplingParams

    check_engine_arguments(args)
    if args.num_samples <= 0:
        raise OptionError(f"--num-samples must be a positive integer, got {args.num_samples}")
    try:
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
            stop_at_eos=not args.ignore_eos,
        )
    except ValueError as e:  # SamplingParams checks each value and names it
        raise OptionError(str(e)) from None
    prompt = None if args.interactive else _read_prompt(args)
    with file_access_errors():
        engine = load_engine(args, quiet=args.quiet)
    if not args.interactive:
        _generate(engine, prompt, params, args, echo=not args.no_echo)
        return 0
    return _session(engine, params, args)


def _session(engine, params, args: argparse.Namespace) -> int:
    """-i: prompts from standard input until EOF or /quit, each generated as it is complete. A prompt
    that fails (a character outside the vocabulary, bytes that are not UTF-8) is one error line on
    stderr and the session goes on; the exit status is then 1. On a terminal: a banner, and the
    >>> and ... prompts on stderr."""
    tty = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 spoil their prompt (_utf8), not the session
        sys.stdin.reconfigure(errors="surrogateescape")
    if tty:
        n = sum(p.numel() for p in engine.model.parameters())
        print(f"simplegpt generate: {model_name(args.checkpoint)} ({n / 1e6:.1f}M parameters); a prompt a line, "
              '\\ at the end goes on to the next line, """ starts and ends a block; Ctrl-D or /quit ends',
              file=sys.stderr)
    failed = False
    lines = _PromptLines()
    while True:
        if tty:
            print(lines.cue, end="", file=sys.stderr, flush=True)
        line = _from_stdin(sys.stdin.readline, check=False)
        if not line and tty:
            print(file=sys.stderr)  # after Ctrl-D, the shell's prompt on a line of its own
        end = not line or (lines.empty and line.strip() in ("/quit", "/exit"))
        prompt = lines.finish() if end else lines.feed(line)  # EOF ends a block or continued line too
        if prompt is not None:
            try:
                # on a terminal the prompt is on the screen already, as typed: only the text follows it
                _generate(engine, _utf8(prompt, "the prompt"), params, args, echo=not (tty or args.no_echo))
            except SimpleGPTError as e:
                print(f"simplegpt generate: error: {e}", file=sys.stderr)
                failed = True
            if params.seed is not None:  # a new prompt, new samples; still reproducible from --seed
                params.seed += args.num_samples
        if end:
            return 1 if failed else 0


class _PromptLines:
    """Lines of an -i session put together into prompts: a line is a prompt, unless it ends in a
    backslash (dropped; the prompt goes on, with a newline, on the next line) or is a \"\"\" line,
    which starts a block that runs to the next \"\"\" line. Empty lines outside a block are skipped."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.block = False

    @property
    def empty(self) -> bool:
        return not self.lines and not self.block

    @property
    def cue(self) -> str:
        """The terminal's prompt: >>> for a new prompt, ... inside one."""
        return ">>> " if self.empty else "... "

    def feed(self, line: str) -> str | None:
        """The prompt that line completes, or None while it is not complete."""
        line = line.removesuffix("\n")
        if self.block:
            if line.strip() == '"""':
                return self.finish()
            self.lines.append(line)
        elif self.empty and line.strip() == '"""':
            self.block = True
        elif line.endswith("\\"):
            self.lines.append(line[:-1])
        elif self.lines or line.strip():
            self.lines.append(line)
            return self.finish()
        return None

    def finish(self) -> str | None:
        """The prompt put together so far (None if there is none), and a fresh start."""
        prompt = "\n".join(self.lines) if self.lines else None
        self.lines, self.block = [], False
        return prompt


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is no text
                return f.read()
        except FileNotFoundError:
            raise OptionError(f"--prompt-file {args.prompt_file} does not exist") from None
        except UnicodeDecodeError:
            raise DataError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None
        except OSError as e:  # a folder, no permission to read
            raise FileAccessError(f"--prompt-file {args.prompt_file}: {e.strerror or e}") from None
    if args.prompt == "-" or (args.prompt is None and not sys.stdin.isatty()):
        text = _from_stdin(sys.stdin.read)
        if not text and args.prompt is None:
            raise DataError("no prompt: standard input was empty; give --prompt TEXT (--prompt '' samples "
                            "unconditionally), --prompt-file PATH, or use -i")
        return text[:-1] if text.endswith("\n") else text  # the newline echo/heredocs add
    if args.prompt is None:
        raise UsageError("no prompt: give --prompt TEXT, --prompt-file PATH, pipe it in, or use -i")
    return _utf8(args.prompt, "--prompt")


def _from_stdin(read: Callable[[], str], check: bool = True) -> str:
    """sys.stdin.read or .readline, checked by _utf8 unless not check (and a DataError where a strict
    stdin cannot decode)."""
    try:
        text = read()
        return _utf8(text, "standard input") if check else text
    except UnicodeDecodeError:
        raise DataError("standard input is not UTF-8 text") from None


def _utf8(text: str, source: str) -> str:
    """text as Python read it from the command line or standard input, where bytes that are not
    UTF-8 become lone surrogates (surrogateescape) that no tokenizer can encode: a DataError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{source} is not UTF-8 text") from None
    return text


def _generate(engine, prompt: str, params, args: argparse.Namespace, echo: bool) -> None:
    """Generates for prompt and prints it (after the prompt when echo); DataError for a prompt the tokenizer
    cannot encode."""
    out = sys.stdout
    try:
        ids = engine.tokenizer.encode(prompt)
    except ValueError as e:  # a character outside a char tokenizer's vocabulary
        raise DataError(f"the prompt cannot be encoded: {e}") from None
    for n in range(args.num_samples) if args.stream else [None]:
        t0 = time.perf_counter()
        if args.stream:
            if args.num_samples > 1:
                print(f"--- sample {n + 1} ---", file=out)
            if echo:
                out.write(prompt)
            stream = engine.stream(ids, _for_sample(params, n))
            for piece in stream:
                out.write(piece)
                out.flush()
            out.write("\n")
            results = [stream.result]
        else:
            results = engine.generate([ids] * args.num_samples, params)
            for i, r in enumerate(results):
                if args.num_samples > 1:
                    print(f"--- sample {i + 1} ---", file=out)
                out.write((prompt if echo else "") + r.text + "\n")
        out.flush()
        if not args.quiet:
            dt = time.perf_counter() - t0
            tokens = sum(len(r.token_ids) for r in results)
            reasons = ",".join(r.finish_reason for r in results)
            print(f"[{tokens} tokens in {dt:.2f}s, {tokens / max(dt, 1e-9):.1f} tok/s, finish: {reasons}]",
                  file=sys.stderr)


def _for_sample(params, n: int):
    """Streamed samples run one at a time; sample n gets seed + n, as row n of a batch would."""
    import dataclasses

    return params if params.seed is None or n == 0 else dataclasses.replace(params, seed=params.seed + n)
