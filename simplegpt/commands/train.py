"""simplegpt train: train (or resume, or fine-tune) a GPT; with no arguments, the quick Shakespeare run."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys
from pathlib import Path

HELP = "train a GPT on text; with no arguments, a character-level Shakespeare model in 5 minutes"
DESCRIPTION = (
    "Train a GPT. Settings come from the speedrun recipe of the machine (speedrun_cpu, or speedrun_gpu "
    "where a CUDA GPU is present: docs/speedrun.md), or --config FILE, and any setting can be overridden "
    "on the command line, e.g. --lr 3e-3 --time 10m. "
    "The recipe trains for a time budget, 5 minutes (--time 2m for another), its learning rate set by the "
    "fraction of the time used so the model is fully decayed when time is up; --max_iters N without --time "
    "trains N steps instead (the schedule then follows the steps), and with --time a max_iters is not used. "
    "The recipe's Muon gives way to AdamW (lr 2e-3) where it cannot run or was not measured: with "
    "--parallel fsdp, --lora or a fine-tune (--init-from, --sft), unless --optimizer is given. "
    "With no arguments it prepares the embedded Shakespeare plays into data/shakespeare_char and trains "
    "into out/shakespeare_char. With --data (or --tokenizer, --init-from) the dataset folder, run folder and "
    "sample prompt follow that data unless given: --data my.txt trains into out/my_char. "
    "It prints an estimate of the time at the start (the budget's, with a progress bar in seconds), and "
    "for a run of max_iters steps warns when they would repeat the training text more than ~20 times. "
    "A finished run is not trained again (--overwrite does). "
    "Ctrl-C or SIGTERM saves a checkpoint you can --resume. "
    "Under torchrun (torchrun --nproc_per_node N -m simplegpt train ...) the N processes train one run "
    "with DDP: see docs/distributed.md. "
    "--sft CHATS --init-from BASE fine-tunes BASE into a chat model on conversations (docs/chat.md): the loss "
    "counts the assistant's tokens only, the chat markers join the vocabulary if BASE lacks them, and a config "
    "file without sft (the built-in one included) gets fine-tuning settings (see --sft)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import KEYS, SECTIONS, default_config_name, load_config, parse_value

    default = default_config_name()
    defaults = load_config().to_dict()  # what `simplegpt train` with no --config uses

    p.add_argument("--config", default=None,
                   help=f"TOML config file, or a built-in name: speedrun_cpu, speedrun_gpu (the default: the one "
                        f"of the machine, here {default}), speedrun_cpu_short (its tuning for seconds), "
                        "shakespeare_char (600 steps of AdamW), "
                        "llama_shakespeare_char, gpt2_124m")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue a run exactly from its checkpoint (RUN/last or the run folder RUN); "
                        "its saved config is used, with any overrides given here. 'auto': continue the run "
                        "of out_dir from its last checkpoint when it has one, else start it (for "
                        "torchrun --max-restarts, whose restarted workers then resume by themselves)")
    p.add_argument("--init-from", dest="init_from_cli", metavar="SRC", default=None,
                   help="start from weights: a simplegpt checkpoint dir, or a Hugging Face GPT-2, Llama or "
                        "Qwen3 dir or name (same as --init_from)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in out_dir (a different one, or this one to train it again)")
    p.add_argument("--stop-at", type=int, metavar="STEP", default=None,
                   help="stop at this step with a checkpoint (continue later with --resume)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (a bar on a terminal, else a plain line every log_interval steps)")

    def converter(name: str):
        def convert(text: str):
            try:
                return parse_value(name, text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        convert.__name__ = KEYS[name].type  # argparse names the type in its error message
        return convert

    for section in SECTIONS:
        group = p.add_argument_group(f"[{section}] settings (override the config file)")
        for name, key in KEYS.items():
            if key.section != section:
                continue
            flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
            if name == "init_from":
                flags = ["--init_from"]
            if name == "max_time":
                flags.append("--time")
            help_text = key.help + (f" ({'|'.join(key.choices)})" if key.choices else "")
            group.add_argument(*flags, dest=name, type=converter(name), default=argparse.SUPPRESS,
                               metavar=key.type.upper(),
                               help=f"{help_text} [{default}: {defaults[name]!r}]")


def run(args: argparse.Namespace) -> int:
    from ..cli import let_rank_0_speak
    from ..errors import SimpleGPTError
    from ..files import BEST
    from ..training.distributed import LostPeer, PeerError, launched
    from ..training.fsdp import is_sharded_checkpoint
    from ..training.loop import train

    try:
        cfg = _train_config(args)
    except SimpleGPTError as e:
        # every rank meets a bad setting or a missing checkpoint (same arguments, same files): rank 0 says it
        if launched() and os.environ["RANK"] != "0":
            let_rank_0_speak()
            return e.exit_code
        raise
    try:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite, stop_at=args.stop_at,
                       progress=not args.quiet)
    except SimpleGPTError as e:
        # Under torchrun rank 0 says it once: an error every rank meets (a setting, a non-finite loss) or
        # one rank 0 reports for another (PeerError). A rank that lost the others says so itself.
        quiet = e.quiet if isinstance(e, PeerError) else os.environ.get("RANK", "0") != "0"
        if quiet and not isinstance(e, LostPeer):
            let_rank_0_speak()
            return e.exit_code
        raise
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone reports the run
        return 0
    if result.already_finished:
        run = shlex.quote(str(result.out_dir))
        again = "" if args.resume else "; to train it again from step 0, add --overwrite"
        longer = (f"--max_time (e.g. simplegpt train --resume {run} --max_time {_twice_the_budget_used(cfg, result)})"
                  if cfg.max_time else
                  f"--max_iters (e.g. simplegpt train --resume {run} --max_iters {2 * result.step})")
        print(f"simplegpt train: {args.resume or result.out_dir} had already finished its {result.step} steps; "
              f"nothing was trained. To train longer, resume with a larger {longer}{again}", file=sys.stderr)
    steps = f"{result.step}" if cfg.max_time else f"{result.step}/{cfg.max_iters}"
    print(f"\nsteps: {steps}   tokens seen: {result.tokens_seen:,}   "
          f"time: {result.elapsed_s:.0f} s")
    if result.val_loss is not None:
        best = f"   best val loss: {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
        print(f"val loss: {result.val_loss:.4f}   val bits/byte: {result.val_bpb:.3f}{best}")
    best_dir = result.out_dir / BEST
    best = f"   best: {best_dir} (lowest val loss)" if best_dir.is_dir() else ""
    print(f"checkpoint: {result.last_checkpoint} (latest, for --resume){best}\nrun folder: {result.out_dir}")
    if result.interrupted is None and best_dir.is_dir() and is_sharded_checkpoint(best_dir):
        # FSDP2's checkpoints are sharded: generate and serve read the consolidated copy
        whole = shlex.quote(f"{best_dir}-consolidated")
        print(f"next: simplegpt consolidate {shlex.quote(str(best_dir))} {whole}   (a sharded FSDP2 checkpoint)")
        print(f"then: simplegpt generate --checkpoint {whole} --prompt {shlex.quote(cfg.sample_prompt.strip())} "
              f"--stream")
    elif result.interrupted is None and best_dir.is_dir() and cfg.sft:
        print(f"next: simplegpt chat --checkpoint {shlex.quote(str(best_dir))}   (the fine-tuned chat model)")
        print(f"  or: simplegpt serve --checkpoint {shlex.quote(str(best_dir))}   (the playground's Chat mode)")
    elif result.interrupted is None and best_dir.is_dir():
        prompt = shlex.quote(cfg.sample_prompt.strip())  # one that fits the vocabulary, or '' (unconditional)
        print(f"next: simplegpt generate --checkpoint {shlex.quote(str(best_dir))} --prompt {prompt} --stream")
        print(f"  or: simplegpt serve --checkpoint {shlex.quote(str(best_dir))}   (API + playground in a browser)")
    if result.interrupted in ("SIGINT", "SIGTERM") and not launched():
        # under torchrun a stop with its checkpoint saved is a success: a failure would be restarted
        return 128 + signal.Signals[result.interrupted].value
    return 0


def _twice_the_budget_used(cfg, result) -> int:
    """Seconds of a budget that trains a finished run on: twice what it has used, which a --max_time
    given on --resume below it (the run then counts as finished) does not say."""
    from ..checkpoint import read_checkpoint_config

    done = read_checkpoint_config(result.last_checkpoint).get("budget_done_s")
    return math.ceil(2 * max(cfg.max_time, done if isinstance(done, (int, float)) else 0.0))


def _train_config(args: argparse.Namespace):
    """The run's TrainConfig: the config file (or a resumed checkpoint's saved config) with the
    command line's overrides. Raises ConfigError or CheckpointError."""
    from ..checkpoint import read_checkpoint_config
    from ..config import KEYS, TrainConfig, adamw_fallback, load_config
    from ..training.run_dir import checkpoint_dir

    overrides = {k: v for k, v in vars(args).items() if k in KEYS}
    if args.init_from_cli is not None:
        overrides["init_from"] = args.init_from_cli
    if args.resume == "auto":
        args.resume = _auto_resume(args.config, overrides)
    if args.resume:
        path = checkpoint_dir(args.resume)
        doc = read_checkpoint_config(path)
        saved = doc.get("train_config")
        if not isinstance(saved, dict):
            from ..errors import CheckpointError
            raise CheckpointError(f"{path} holds no training config; it was not written by 'simplegpt train'")
        # the flat keys every version of the trainer saved; keys it no longer has are left out
        cfg = TrainConfig(**{**{k: v for k, v in saved.items() if k in KEYS}, **overrides})
        _check_muon_overrides(overrides, cfg)
        return cfg
    from ..training.lora import check_overrides
    from ..training.start import check_init_overrides

    check_overrides(overrides)  # --lora 0, or LoRA options without --lora
    cfg = load_config(args.config, overrides)
    if args.config is None and (why := adamw_fallback(overrides)) and os.environ.get("RANK", "0") == "0":
        print(f"note: {why}: the default recipe's Muon gives way to AdamW (lr {cfg.lr:g}); --optimizer "
              "chooses", flush=True)
    _check_muon_overrides(overrides, cfg)
    check_init_overrides(cfg, overrides)  # a fine-tune's shape is its weights'
    return cfg


MUON_OPTIONS = ("muon_momentum", "adamw_lr_ratio")


def _check_muon_overrides(overrides: dict, cfg) -> None:
    """ConfigError for Muon's options set on the command line, to other than their defaults, for a run
    that trains with AdamW, which would leave them unused without a word (a whole config written out
    as options, defaults included, is not refused)."""
    from ..config import TrainConfig

    defaults = TrainConfig()
    if cfg.optimizer != "muon" and (given := [k for k in MUON_OPTIONS
                                              if k in overrides and overrides[k] != getattr(defaults, k)]):
        from ..errors import ConfigError

        raise ConfigError(f"--{given[0]} applies to optimizer = 'muon' only, and this run trains with "
                          f"{cfg.optimizer!r}; add --optimizer muon or leave --{given[0]} out")


def _auto_resume(config: str | None, overrides: dict) -> str | None:
    """--resume auto: the last checkpoint of the run folder the config and overrides name, when it
    holds one; None (start the run) otherwise."""
    from ..config import load_config
    from ..files import LAST
    from ..training.run_dir import checkpoint_step

    out = Path(load_config(config, overrides).out_dir)
    # as the loaders find last/: at any point of an interrupted save, as --resume RUN/last does
    return str(out / LAST) if checkpoint_step(out / LAST) is not None else None
