"""simplegpt chat: a multi-turn conversation with a checkpoint in the terminal."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

from ..cli import (add_checkpoint_argument, add_engine_arguments, add_sampling_arguments, check_engine_arguments,
                   load_engine, model_name)
from ..console import count
from ..errors import DataError, OptionError, UnknownCharacterError, file_access_errors

HELP = "chat with a checkpoint in the terminal"
DESCRIPTION = (
    "chat with a checkpoint: each line read from standard input is your next message, and the reply is "
    "printed as it is generated, up to the end-of-turn marker. A model fine-tuned for chat is prompted with "
    "its chat template; a base model with the plain 'User: ... / Assistant:' text. When the conversation "
    "outgrows the model's context, its oldest turns are left out (it says so on stderr). Commands: /reset "
    "starts over (the system prompt stays), /save FILE writes the conversation as JSON "
    '({"messages": [...]}, the fine-tuning format; FILE is replaced), /help lists the commands, /quit or end of '
    'input ends. A message that starts with "/" is sent by doubling it: "//help" sends "/help".'
)
COMMANDS = ("/reset", "/save FILE", "/help", "/quit")
ESCAPE = 'a message that starts with "/" is sent by doubling it: //help sends /help'



def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(p, "checkpoint directory to load")
    p.add_argument("--system", metavar="TEXT", default=None, help="a system prompt: the conversation's first message")
    add_sampling_arguments(p, max_new_tokens=256, temperature=0.7, per="per reply")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible replies")
    add_engine_arguments(p, "a chat")


def run(args: argparse.Namespace) -> int:
    from ..chat import PlainChat, chat_format
    from ..generation.sampling import SamplingParams

    check_engine_arguments(args)
    try:  # checked before the model loads
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        raise OptionError(str(e)) from None
    with file_access_errors():
        engine = load_engine(args)
    fmt = chat_format(engine.tokenizer)
    if isinstance(fmt, PlainChat):  # else every message would be refused for characters the user never typed
        try:
            fmt.prompt_ids([{"role": "user", "content": ""}])
        except UnknownCharacterError as e:
            raise DataError(f"{args.checkpoint} has no chat template, and its vocabulary lacks characters of the "
                            f"plain 'User: ... / Assistant:' prompt ({', '.join(map(repr, e.chars))}); chat with a "
                            "model trained with --tokenizer byte, gpt2 or bpe:N, or one fine-tuned for chat") from None
    params = dataclasses.replace(params, stop=fmt.stop)
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 spoil their line, not the session
        sys.stdin.reconfigure(errors="surrogateescape")
    tty = sys.stdin.isatty()
    if tty:
        kind = "plain template (a base model)" if isinstance(fmt, PlainChat) else "chat template"
        say(f"{model_name(args.checkpoint)}, {kind}; commands: {', '.join(COMMANDS)}")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    failed = False
    while True:
        if tty:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return 1 if failed else 0
        text = line.rstrip("\n")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            failed = True
            say("error: the line is not UTF-8 text")
            continue
        word, _, rest = text.strip().partition(" ")
        if word.startswith("//"):  # the escape: the message is the line with one slash less
            word, text = "", text.replace("/", "", 1)
        if word == "/reset":
            messages = list(system)
            say("the conversation starts over")
        elif word == "/save":
            failed |= not _save(messages, rest.strip())
        elif word == "/help":
            say(f"commands: /reset (start over; the system prompt stays), /save FILE (the conversation as JSON), "
                f"/help, /quit; {ESCAPE}")
        elif word.startswith("/") and word[1:].isalpha():
            failed = True
            say(f"error: unknown command {word}; the commands are {', '.join(COMMANDS)}; {ESCAPE}")
        elif text.strip():
            try:
                messages = _reply(engine, fmt, params, [*messages, {"role": "user", "content": text}])
            except DataError as e:
                failed = True
                say(f"error: {e}")


def say(text: str) -> None:
    print(f"simplegpt chat: {text}", file=sys.stderr, flush=True)


def fit_context(fmt, messages: list[dict], room: int) -> tuple[list[dict], list[int], int]:
    """The messages left, their prompt ids (at most `room` tokens) and how many were left out: the
    oldest turns after the system prompt go first, a user message and the replies after it at a time.
    DataError when the last message alone does not fit."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    dropped = 0
    while True:
        ids = fmt.prompt_ids(system + turns)
        if len(ids) <= room:
            return system + turns, ids, dropped
        if len(turns) <= 1:
            raise DataError(f"the message is {len(ids)} tokens with the template, more than the {room} the model's "
                            "context leaves for it; send a shorter one")
        cut = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), len(turns) - 1)
        turns = turns[cut:]
        dropped += cut


def _reply(engine, fmt, params, messages: list[dict]) -> list[dict]:
    """Streams the reply to messages on stdout; the messages with it (and without the turns the context
    could not hold). DataError for a message the tokenizer cannot encode or the context cannot hold."""
    window = engine.window
    room = window - min(params.max_new_tokens, window // 2)  # the reply gets at least half the context
    try:
        kept, ids, dropped = fit_context(fmt, messages, room)
    except ValueError as e:  # a character outside a char tokenizer's vocabulary
        raise DataError(str(e)) from None
    if dropped:
        say(f"the conversation outgrew the model's context of {window} tokens: the oldest "
            f"{count(dropped, 'message')} left out")
    from ..chat import PlainChat

    plain = isinstance(fmt, PlainChat)  # its reply follows 'Assistant:' and a space
    stream = engine.stream(ids, params)
    started = not plain
    for piece in stream:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        print(piece, end="", flush=True)
    print(flush=True)
    reply = stream.result.text
    return [*kept, {"role": "assistant", "content": reply.lstrip() if plain else reply}]


def _save(messages: list[dict], name: str) -> bool:
    """Writes {"messages": [...]} to the file `name` (replacing it, through a temporary file); says
    what it did, or why not. False when it could not."""
    if not name:
        say("error: /save needs a file name: /save chat.json")
        return False
    path = Path(name).expanduser()
    if path.is_dir():
        say(f"error: {path} is a folder; /save needs a file name: /save {path / 'chat.json'}")
        return False
    if path.exists() and not path.is_file():  # /dev/null, a pipe: the rename would put a file in its place
        say(f"error: {path} is not a regular file; /save writes a new file or replaces one")
        return False
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # hidden and unique: no file of the user's is hit
    try:
        tmp.write_text(json.dumps({"messages": messages}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # named as the user wrote it, with nothing left behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        say(f"error: {path}: cannot be written ({e.strerror or e})")
        return False
    say(f"saved {len(messages)} messages to {path}")
    return True
