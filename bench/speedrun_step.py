"""The CPU speedrun's step and start, piece by piece: where its milliseconds go.

The step: the speedrun recipe (configs/speedrun_cpu.toml) set up as train() sets it up (its way of
running, model, optimizer), then steps that alternate between Muon's step split over the cores (what
the trainer runs) and Muon's step on one thread, so that load from other processes hits both alike.
Per variant, the median milliseconds of each part: drawing the batch, forward + backward, the
clipped optimizer step, zero_grad, and the whole step; and tokens/s.

The start: train() called in fresh processes (so that every import it makes is counted, as a user's
`simplegpt train` pays it), timed to the moment the first step's forward begins. --profile-start
prints the start's costliest calls.

The load average is printed before and after: two cores shared with other work give noisy numbers.

    python bench/speedrun_step.py [--steps 200] [--starts 3] [--threads 2] [--profile-start]
        [--data ../shared/data/tinyshakespeare.txt] [--config configs/speedrun_cpu.toml]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simplegpt.config import TrainConfig, load_config  # noqa: E402
from simplegpt.data.prepare import prepare_corpus  # noqa: E402


FIRST_STEPS = 4  # the start's processes time this many first steps too


def settings(data: Path, out: Path, threads: int) -> dict:
    """The speedrun recipe's overrides for these measurements: no evaluation, sample or plot in the way."""
    return dict(data=str(data), num_threads=threads, sample_tokens=0, plot=False, tensorboard=False, eval_iters=1,
                eval_interval=10**9, out_dir=str(out))


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


class Stepper:
    """A run of `cfg` set up as train() sets it up (its way of running, model, optimizer), stepped one
    training step at a time by the caller, so that two runs can alternate step by step; a context
    manager (the run's lock and threads are released on exit). cfg's max_iters should be large: the
    LR schedule reads it."""

    PARTS = ("batch", "forward+backward", "clip_and_step", "zero_grad")

    def __init__(self, cfg: TrainConfig):
        from simplegpt.devices import resolve_device
        from simplegpt.training import hardware, ways
        from simplegpt.training.cpu_memory import keep_freed_memory
        from simplegpt.training.loss import weights
        from simplegpt.training.optimizer import make_optimizer
        from simplegpt.training.setup import begin, load_data, prepare

        self.cfg, self._weights = cfg, weights
        device = resolve_device(cfg.device)
        hardware.configure_backends(device)  # as train() does, and its loop's keep_freed_memory
        self._exit = contextlib.ExitStack()
        with self._exit as stack:
            self.way = ways.select(cfg, device)
            stack.callback(self.way.close)
            stack.enter_context(keep_freed_memory(device.type == "cpu"))
            self.start = begin(cfg, self.way, None, True, None, False)
            stack.callback(self.start.lock.release)
            self.data = load_data(self.start, self.way)
            training = prepare(self.start, self.data, self.way, make_optimizer)
            self._exit = stack.pop_all()  # kept open until close()
        self.optimizer, self.loss_fn = training.optimizer, training.compute.loss
        self.tokens = cfg.batch_size * cfg.block_size * cfg.grad_accum_steps

    def step(self, split: bool = True) -> dict[str, float]:
        """One training step; seconds of each of PARTS and of the whole "step". split: the optimizer
        step as the way of running takes it (the trainer's), else optimizer.clip_and_step on one thread."""
        cfg = self.cfg
        t = [time.perf_counter()]
        batches = [self.loss_fn.prepare(self.data.train.next_batch()) for _ in range(cfg.grad_accum_steps)]
        step_weights = self._weights([self.loss_fn.tokens(batch) for batch in batches])
        t.append(time.perf_counter())
        self.way.forward_backward(batches, step_weights)
        t.append(time.perf_counter())
        if split:
            self.way.clip_and_step(self.optimizer, cfg.grad_clip)
        else:
            self.optimizer.clip_and_step(cfg.grad_clip)
        t.append(time.perf_counter())
        self.optimizer.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        parts = {part: b - a for part, a, b in zip(self.PARTS, t, t[1:])}
        parts["step"] = t[-1] - t[0]
        return parts

    def close(self) -> None:
        self._exit.close()

    def __enter__(self) -> "Stepper":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def time_steps(cfg: TrainConfig, steps: int) -> dict[str, dict[str, float]]:
    """Median ms of each part of a step, per variant (split / one thread), over `steps` steps each."""
    variants = {"split": True, "one thread": False}
    parts: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    with Stepper(cfg) as stepper:
        for i in range(2 * (steps + 5)):
            name = list(variants)[i % 2]
            timed = stepper.step(variants[name])
            if i >= 10:  # the first steps warm up (allocations, the split's optimizers)
                for part, seconds in timed.items():
                    parts[name].setdefault(part, []).append(seconds)
    return {name: {part: statistics.median(v) * 1e3 for part, v in times.items()} for name, times in parts.items()}


def start_child(spec: str, profile: bool) -> None:
    """In a fresh process: train() of spec's {"config", "overrides"} for a few steps, timed from its call
    to its first forward, and its first steps (forward to forward)."""
    t0 = time.perf_counter()
    from simplegpt.training import loop, ways

    first: list[float] = []
    for cls in (ways.Single, ways.CoreShardsWay):
        real = cls.forward_backward

        def timed(self, *a, _real=real, **kw):
            first.append(time.perf_counter())
            return _real(self, *a, **kw)

        cls.forward_backward = timed
    spec = json.loads(spec)
    cfg = load_config(spec["config"], spec["overrides"])
    t_import = time.perf_counter() - t0
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t_call = time.perf_counter()
    loop.train(cfg, overwrite=True, progress=False, log=lambda s: None)
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
    print(json.dumps({"start_s": first[0] - t_call, "import_s": t_import,
                      "first_steps_s": [b - a for a, b in zip(first, first[1:])]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    p.add_argument("--config", default=str(ROOT / "configs" / "speedrun_cpu.toml"))
    p.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    p.add_argument("--starts", type=int, default=3, help="fresh processes timing the start")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile-start", action="store_true")
    p.add_argument("--start-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.start_child is not None:
        start_child(args.start_child, args.profile_start)
        return

    work = Path(tempfile.mkdtemp(prefix="speedrun-step-"))
    text = args.data.read_text(encoding="utf-8")
    (work / "shakespeare.txt").write_text(text, encoding="utf-8")
    data = work / "data"
    # nanoGPT's split, as bench/speedrun.py: the last 10% of the characters validate
    val_tokens = len(text) - int(len(text) * 0.9) + 1
    prepare_corpus(str(work / "shakespeare.txt"), data, tokenizer="char", val_tokens=val_tokens, progress=False)
    overrides = {**settings(data, work / "out", args.threads), "max_iters": FIRST_STEPS + 1}
    cfg = load_config(args.config, overrides)
    print(f"load average before: {load()}")
    spec = json.dumps({"config": args.config, "overrides": overrides})
    starts = []
    for _ in range(args.starts):
        cmd = [sys.executable, __file__, "--start-child", spec] + (["--profile-start"] if args.profile_start else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=work)
        if args.profile_start:
            print(proc.stderr)
        starts.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    each = ", ".join(f"{s['start_s']:.3f}" for s in starts)
    firsts = [statistics.median(s["first_steps_s"][i] for s in starts) * 1e3 for i in range(FIRST_STEPS)]
    print(f"start (train() call to the first step's forward, fresh processes): median "
          f"{statistics.median(s['start_s'] for s in starts):.3f} s of {each}; importing simplegpt.training "
          f"before it: median {statistics.median(s['import_s'] for s in starts):.3f} s")
    print(f"its first {FIRST_STEPS} steps, median ms: " + ", ".join(f"{ms:.1f}" for ms in firsts))
    if args.steps < 1:
        return
    torch.set_num_threads(args.threads)
    parts = time_steps(cfg.replace(max_iters=10**9), args.steps)
    tokens = cfg.batch_size * cfg.block_size * cfg.grad_accum_steps
    print(f"step parts, median ms over {args.steps} steps each (alternating):")
    names = list(next(iter(parts.values())))
    print("  " + " " * 12 + "".join(f"{n:>18s}" for n in names) + f"{'tok/s':>10s}")
    for variant, ms in parts.items():
        print(f"  {variant:12s}" + "".join(f"{ms[n]:18.2f}" for n in names) + f"{tokens / ms['step'] * 1e3:10,.0f}")
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
