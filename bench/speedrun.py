"""The CPU speedrun: how fast simplegpt gets a character-level Shakespeare model to nanoGPT's quality.

In one process, per seed, it trains (a) nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide, block
64, batch 12, no dropout, AdamW at 1e-3 with 100 warmup steps and cosine decay to 1e-4, 2000
iterations) on simplegpt's GPT-2 model, and (b) the speedrun recipe (configs/speedrun_cpu.toml,
a time budget), and with --nanogpt DIR also (c) nanoGPT's own train.py from a checkout.

The protocol (docs/speedrun.md): tinyshakespeare.txt split as nanoGPT splits it (the first 90% of
the characters to train on, the rest to validate), and the validation loss as the mean
cross-entropy of every character of the validation split in consecutive windows of 64 (each
character predicted from the at most 64 before it in its window): 111,539 characters, 1,743
windows, in nats and bits per character. The clock is the trainer's (metrics.jsonl's train_s):
from the call of train() (data loading, model building and any compilation included) with the
evaluations left out; the bench evaluates while the clock is paused, at each of the trainer's
evaluations. nanoGPT's own run (c) is timed as its whole process (imports and its own evaluations
included) and evaluated with the protocol from its last checkpoint.

Prints per seed the seconds each recipe needs to reach the target (1.8857: nanoGPT's
2000-iteration result here; linear between the evaluations that straddle it), their ratio, and
the loss each has at a fifth of the speedrun's time budget and at its end (60 s and 300 s for the
5-minute recipe, 2 s and 10 s for speedrun_cpu_short; points of each run's curve, not runs given
that long), then the medians over the seeds. Writes the curves as JSON, and as a PNG with --png.

--ablations [NAME ...] also trains, per seed, the speedrun recipe with one change each (ABLATIONS;
all of them by default) and prints a markdown table row for each: its seconds to the target and its
loss at the end. "no_wsd" trains as many steps as the seed's speedrun run took, with a cosine
schedule by iterations instead of the time budget's warmup-stable-decay.

    python bench/speedrun.py [--data ../shared/data/tinyshakespeare.txt] [--seeds 1337 1338 1339]
        [--budget SECONDS] [--config configs/speedrun_cpu.toml] [--nanogpt DIR] [--png docs/speedrun.png]
        [--ablations [adamw batch12 lr_x2 lr_half no_wsd rotary_rmsnorm]]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simplegpt.checkpoint import load_checkpoint  # noqa: E402
from simplegpt.config import TrainConfig, load_config  # noqa: E402
from simplegpt.data.prepare import prepare_corpus  # noqa: E402
from simplegpt.files import LAST  # noqa: E402
from simplegpt.training.loop import train  # noqa: E402

TARGET = 1.8857  # nanoGPT's 2000-iteration CPU recipe: its validation loss on this machine
WINDOW = 64
MARKS = (0.2, 1.0)  # fractions of the speedrun's time budget at which each curve's loss is read
NANOGPT = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, batch_size=12, lr=1e-3, min_lr=1e-4,
               warmup_iters=100, schedule="cosine", max_iters=2000, beta2=0.99, weight_decay=0.1, grad_clip=1.0)
# The ablations: the speedrun recipe with one change each (name: (what changed, the keys it sets, given the
# recipe's config)). AdamW runs at 2e-3 (Muon's lr is on another scale, and 2e-3 is nanoGPT's order);
# no_wsd trains as many steps as the seed's speedrun run took (main() adds them).
ABLATIONS = {
    "adamw": ("AdamW 2e-3 instead of Muon", lambda base: {"optimizer": "adamw", "lr": 2e-3}),
    "batch12": ("nanoGPT's batch 12", lambda base: {"batch_size": 12}),
    "lr_x2": ("lr x2", lambda base: {"lr": 2 * base.lr, "min_lr": 2 * base.min_lr}),
    "lr_half": ("lr /2", lambda base: {"lr": base.lr / 2, "min_lr": base.min_lr / 2}),
    "no_wsd": ("no WSD: cosine by iterations (the speedrun's steps)", lambda base: {"schedule": "cosine",
                                                                                  "max_time": 0.0}),
    "rotary_rmsnorm": ("rotary positions + RMSNorm", lambda base: {"positions": "rotary", "norm": "rmsnorm"}),
}
# nanoGPT's README command for a CPU, as train.py options
NANOGPT_ARGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
                "--lr_decay_iters=2000", "--dropout=0.0", "--dtype=float32"]


def split_text(path: Path) -> tuple[str, str]:
    """nanoGPT's split: the first int(0.9 n) characters train, the rest validate."""
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    return text[:cut], text[cut:]


def protocol_loss(model: torch.nn.Module, ids: list[int], batch: int = 64) -> float:
    """Mean cross-entropy (nats) of every id of `ids` but the first, each predicted from at most WINDOW
    ids before it: consecutive windows of WINDOW inputs, the last one shorter."""
    data = torch.tensor(ids, dtype=torch.long)
    starts = list(range(0, len(ids) - 1, WINDOW))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        full = [s for s in starts if s + WINDOW + 1 <= len(ids)]
        for i in range(0, len(full), batch):
            x = torch.stack([data[s:s + WINDOW] for s in full[i:i + batch]])
            y = torch.stack([data[s + 1:s + WINDOW + 1] for s in full[i:i + batch]])
            total += float(F.cross_entropy(logits_of(model, x).flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
        for s in starts[len(full):]:  # the tail
            x, y = data[s:len(ids) - 1][None], data[s + 1:][None]
            total += float(F.cross_entropy(logits_of(model, x).flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
    assert count == len(ids) - 1
    return total / count


def logits_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T, vocab) logits, of simplegpt's GPT or nanoGPT's (which wants targets for all of them)."""
    out = model(x, x) if type(model).__module__ == "model" else model(x)
    return out[0]


def run_simplegpt(name: str, cfg: TrainConfig, val_text: str, log: bool) -> dict:
    """Train cfg: {"curve": [(train_s, protocol val loss)] at each of its evaluations and its end,
    "steps", "tokens", "tok_per_s": the median of its train records' (the load of the machine shows there)}."""
    out, evaluated = Path(cfg.out_dir), {}

    def evaluate_last() -> None:  # the checkpoint of the previous evaluation; the trainer's clock is paused
        ck = load_checkpoint(out / LAST)
        step = int(ck.metadata["step"])
        if step not in evaluated:
            evaluated[step] = protocol_loss(ck.model, ck.tokenizer.encode(val_text))
            if log:
                print(f"  {name}: step {step}: protocol val loss {evaluated[step]:.4f}", flush=True)

    def hook(line: str) -> None:
        if re.match(r"step \d+: val loss", line) and (out / LAST).is_dir():
            evaluate_last()

    train(cfg, overwrite=True, progress=False, log=hook)
    evaluate_last()
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["train_s"] for r in records if r["kind"] == "eval"}
    train_records = [r for r in records if r["kind"] == "train"]
    return {"curve": [(times[step], loss) for step, loss in sorted(evaluated.items())],
            "steps": train_records[-1]["step"], "tokens": train_records[-1]["tokens"],
            "tok_per_s": statistics.median(r["tok_per_s"] for r in train_records[1:] or train_records)}


def nanogpt_iters(extra: list[str]) -> int:
    """The max_iters nanoGPT's train.py runs: the recipe's, or the last --max_iters=N of `extra`."""
    given = [a.split("=", 1)[1] for a in NANOGPT_ARGS + extra if a.startswith("--max_iters=")]
    return int(given[-1])


def run_nanogpt(checkout: Path, train_text: str, val_text: str, seed: int, work: Path,
                extra: list[str], threads: int) -> tuple[float, float]:
    """nanoGPT's train.py from `checkout` with its README's CPU command, on the same split: (wall seconds
    of its process, protocol val loss of its final checkpoint)."""
    chars = sorted(set(train_text + val_text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = work / "data" / "shakespeare_char"
    data.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train_text), ("val", val_text)):
        np.array([stoi[c] for c in text], dtype=np.uint16).tofile(data / f"{split}.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    if not (work / "configurator.py").exists():
        (work / "configurator.py").symlink_to(checkout / "configurator.py")  # train.py reads it from its cwd
    out = work / f"out-{seed}"
    cmd = [sys.executable, str(checkout / "train.py"), str(checkout / "config" / "train_shakespeare_char.py"),
           *NANOGPT_ARGS, f"--out_dir={out}", "--always_save_checkpoint=True", *extra]  # it seeds itself: 1337
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # the threads simplegpt's runs are given
    subprocess.run(cmd, cwd=work, check=True, stdout=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - t0
    sys.path.insert(0, str(checkout))
    from model import GPT as NanoGPT, GPTConfig as NanoConfig  # nanoGPT's own model.py

    ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    model = NanoGPT(NanoConfig(**ck["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()})
    return wall, protocol_loss(model, [stoi[c] for c in val_text])


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first time the curve reaches target, linear between the two evaluations around it."""
    for (t0, l0), (t1, l1) in zip([(0.0, math.inf)] + curve, curve):
        if l1 <= target:
            return t1 if not math.isfinite(l0) else t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def loss_at(curve: list[tuple[float, float]], t: float) -> float | None:
    """The loss at t seconds: linear between evaluations; after the run's end, its last; None before
    its first evaluation."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if t0 <= t <= t1:
            return l0 + (l1 - l0) * (t - t0) / (t1 - t0)
    return curve[-1][1] if t >= curve[-1][0] else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
                   help="tinyshakespeare.txt, split as nanoGPT splits it (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339],
                   help="one run of each recipe per seed (default: %(default)s)")
    p.add_argument("--budget", default=None,
                   help="the speedrun's time budget (seconds, or 5m; 0: none, then --set max_iters=N trains N "
                        "steps); default: the config's max_time")
    p.add_argument("--config", default=str(ROOT / "configs" / "speedrun_cpu.toml"),
                   help="the speedrun recipe: a TOML file or a built-in name such as speedrun_cpu_short "
                        "(default: configs/speedrun_cpu.toml)")
    p.add_argument("--recipes", nargs="+", default=["nanogpt_recipe", "speedrun"],
                   choices=["nanogpt_recipe", "speedrun"],
                   help="which to train per seed: nanoGPT's CPU recipe on simplegpt's model, the speedrun "
                        "recipe of --config (default: both)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override keys of the speedrun recipe (ablations), e.g. --set optimizer=adamw")
    p.add_argument("--ablations", nargs="*", default=None, choices=list(ABLATIONS), metavar="NAME",
                   help="also the speedrun recipe with one change each, per seed (all of them when no NAME is "
                        "given: " + ", ".join(ABLATIONS) + "); a markdown table row each")
    p.add_argument("--nanogpt", type=Path, default=None, help="a nanoGPT checkout: time its own train.py too")
    p.add_argument("--nanogpt-args", default="", metavar="'--KEY=VALUE ...'",
                   help="more options for nanoGPT's train.py, after the recipe's (a quick check: "
                        "--nanogpt-args='--max_iters=20 --lr_decay_iters=20 --eval_interval=10')")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every run (default: %(default)s)")
    p.add_argument("--json", type=Path, default=Path("speedrun.json"),
                   help="where the curves and results are written (default: %(default)s)")
    p.add_argument("--png", type=Path, default=None, help="also plot the curves into this PNG")
    p.add_argument("--quiet", action="store_true",
                   help="no line per evaluation (its protocol val loss) while the runs train")
    return p


def main() -> None:
    args = build_parser().parse_args()

    from simplegpt.config import parse_value

    train_text, val_text = split_text(args.data)
    work = Path(tempfile.mkdtemp(prefix="speedrun-"))
    train_file = work / "shakespeare.txt"
    train_file.write_text(train_text + val_text, encoding="utf-8")
    data = work / "data"
    # the stream ends with an end-of-text token: the validation tail is the val text and it
    prepare_corpus(str(train_file), data, tokenizer="char", val_tokens=len(val_text) + 1, progress=False)
    meta = json.loads((data / "meta.json").read_text())
    assert meta["tokens"]["train"] == len(train_text), "the split must be nanoGPT's"
    common = dict(data=str(data), num_threads=args.threads, sample_tokens=0, plot=False, tensorboard=False,
                  eval_iters=1)  # the trainer's own val loss is not the protocol: one batch of it is enough
    overrides = {k: parse_value(k, v) for k, v in (kv.split("=", 1) for kv in args.set)}
    ablations = [] if args.ablations is None else args.ablations or list(ABLATIONS)
    recipes = args.recipes + (["speedrun"] if ablations and "speedrun" not in args.recipes else [])
    budget = {} if args.budget is None else {"max_time": parse_value("max_time", args.budget)}
    budget_s = load_config(args.config, {**common, **budget, **overrides}).max_time or 300.0
    marks = [fraction * budget_s for fraction in MARKS]
    results: dict[str, dict] = {}
    for seed in args.seeds:
        for recipe in recipes + [f"ablation:{name}" for name in ablations]:
            if recipe == "nanogpt_recipe":
                cfg = TrainConfig(**NANOGPT, **common, eval_interval=250, seed=seed, out_dir=str(work / f"a{seed}"))
            else:
                settings = {**common, "seed": seed, "out_dir": str(work / f"{recipe.replace(':', '_')}-{seed}"),
                            **budget, **overrides}
                change = {}
                if recipe.startswith("ablation:"):
                    change = ABLATIONS[recipe.split(":", 1)[1]][1](load_config(args.config, settings))
                if "max_time" in change:  # by iterations: as many steps as the speedrun took in its budget
                    change["max_iters"] = results["speedrun"][seed]["steps"]
                cfg = load_config(args.config, {**settings, **change})
            run = run_simplegpt(recipe, cfg, val_text, not args.quiet)
            curve = run["curve"]
            results.setdefault(recipe, {})[seed] = {**run, "time_to_target": time_to(curve, TARGET),
                                                    "final_loss": curve[-1][1],
                                                    **{loss_key(m): loss_at(curve, m) for m in marks}}
        if args.nanogpt is not None:
            extra = shlex.split(args.nanogpt_args)
            wall, loss = run_nanogpt(args.nanogpt.resolve(), train_text, val_text, seed, work / "nanogpt",
                                     extra, args.threads)
            results.setdefault("nanogpt_itself", {})[seed] = {"wall_s": wall, "loss": loss,
                                                              "iters": nanogpt_iters(extra),
                                                              "time_to_target": wall if loss <= TARGET else None}
        report(results, seed, marks)
        if ablations:
            ablation_rows(results, seed, ["speedrun"] + [f"ablation:{name}" for name in ablations])
    print("\nmedians over seeds " + ", ".join(map(str, args.seeds)) + ":")
    for recipe, runs in results.items():
        line = [f"  {recipe:24s}"]
        for key in ("time_to_target", *map(loss_key, marks), "final_loss", "loss"):
            values = [r[key] for r in runs.values() if key in r]
            if values:
                reached = [v for v in values if v is not None]
                med = statistics.median(reached) if len(reached) == len(values) else None
                none = "before the first evaluation" if key.startswith("loss_at") else "not reached"
                line.append(f"{key} {fmt(med, none=none)}" + (f" ({fmt(med / math.log(2))} bits/char)" if "loss" in key
                                                              and med is not None else ""))
        print("  ".join(line))
    args.json.write_text(json.dumps({"target": TARGET, "budget_s": budget_s, "set": args.set, "results": results},
                                    indent=1))
    print(f"curves: {args.json}")
    if args.png:
        plot(results, args.png, args.threads)


def loss_key(seconds: float) -> str:
    return f"loss_at_{seconds:g}s"


def fmt(value: float | None, unit: str = "", none: str = "not reached") -> str:
    return none if value is None else f"{value:.4g}{unit}"


def report(results: dict[str, dict], seed: int, marks: list[float]) -> None:
    print(f"seed {seed}:")
    for recipe, runs in results.items():
        r = runs.get(seed)
        if r is None:
            continue
        if "curve" in r:
            early, end = (r[loss_key(m)] for m in marks)
            early = "- (before the first evaluation)" if early is None else f"{early:.4f}"
            print(f"  {recipe:24s} time to {TARGET}: {fmt(r['time_to_target'], ' s')}   loss after {marks[0]:g} s "
                  f"{early}, after {marks[1]:g} s {end:.4f} nats/char "
                  f"({end / math.log(2):.4f} bits/char); final {r['final_loss']:.4f} after "
                  f"{r['steps']} steps, {r['tokens']:,} tokens, {r['tok_per_s']:,.0f} tok/s")
        else:
            print(f"  {recipe:24s} {r['iters']} iterations in {r['wall_s']:.1f} s (whole process), "
                  f"loss {r['loss']:.4f}")
    base = results.get("nanogpt_recipe", {}).get(seed, {}).get("time_to_target")
    fast = results.get("speedrun", {}).get(seed, {}).get("time_to_target")
    if base and fast:
        print(f"  ratio (nanoGPT recipe / speedrun): {base / fast:.2f}x")


def ablation_rows(results: dict[str, dict], seed: int, names: list[str]) -> None:
    """The seed's ablation table: a markdown row per run, the speedrun recipe's first."""
    print(f"\n| seed | run | seconds to {TARGET} | loss at the end (nats/char) | steps | tokens | tok/s |\n"
          "|---|---|---|---|---|---|---|")
    for name in names:
        r = results[name][seed]
        what = "the speedrun recipe" if name == "speedrun" else ABLATIONS[name.split(":", 1)[1]][0]
        print(f"| {seed} | {what} | {fmt(r['time_to_target'])} | {r['final_loss']:.4f} | {r['steps']} | "
              f"{r['tokens']:,} | {r['tok_per_s']:,.0f} |")
    print(flush=True)


def plot(results: dict[str, dict], png: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=90)
    for recipe, runs in results.items():
        for i, (seed, r) in enumerate(runs.items()):
            if "curve" in r:
                t, loss = zip(*r["curve"])
                ax.plot(t, loss, marker=".", color=f"C{list(results).index(recipe)}",
                        label=recipe if i == 0 else None, alpha=0.8)
    ax.axhline(TARGET, color="grey", ls="--", lw=0.8, label=f"target {TARGET}")
    ax.set_xlabel(f"training seconds ({threads} CPU threads; evaluation not counted)")
    ax.set_ylabel("val loss (nats/char)")
    ax.set_ylim(1.4, 2.6)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
