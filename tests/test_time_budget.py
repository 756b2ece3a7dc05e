"""The wall-clock budget (max_time / --time): the run ends with its budget, the schedule follows the
fraction of it used and ends at min_lr, and a resumed budgeted run replays the uninterrupted one.
A fake clock is injected (train(clock=...)): its readings are deterministic, so nothing here
depends on how fast the machine is."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simplegpt.checkpoint import load_checkpoint, load_train_state
from simplegpt.config import TrainConfig, load_config, parse_duration, parse_value, read_toml
from simplegpt.errors import ConfigError
from simplegpt.training.budget import Budget
from simplegpt.training.loop import train
from simplegpt.training.optimizer import lr_at_fraction


class StepClock:
    """A clock that moves on by `tick` seconds at each reading: the trainer reads its budget's clock
    once per step (and once after each evaluation, which pauses the budget), so each step lasts one tick."""

    def __init__(self, tick: float = 1.0) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@pytest.fixture
def corpus(tmp_path, shakespeare_path):
    path = tmp_path / "corpus.txt"
    path.write_text(shakespeare_path.read_text()[:60_000])
    return path


def tiny(tmp_path, corpus, **kw) -> TrainConfig:
    base = dict(data=str(corpus), data_dir=str(tmp_path / "data"), n_layer=1, n_head=2, n_embd=16, block_size=16,
                batch_size=4, max_iters=3, max_time=10.5, eval_interval=4, eval_iters=2, log_interval=1,
                sample_tokens=0, out_dir=str(tmp_path / "run"), num_threads=1, plot=False, tensorboard=False,
                peak_flops=1e12, schedule="wsd", warmup_fraction=0.2, decay_fraction=0.3, lr=1e-2, min_lr=1e-3)
    return TrainConfig(**{**base, **kw})


def train_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_the_budget_ends_the_run_within_one_step_of_it(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus)  # max_iters=3 is not what ends a budgeted run
    result = train(cfg, progress=False, clock=StepClock(1.0))
    records = train_records(tmp_path / "run")
    assert result.step == 11 and len(result.losses) == 11  # 10 one-second steps leave 0.5 s: one more step
    used = records[-1]["budget_s"]
    assert cfg.max_time <= used < cfg.max_time + 1.0  # within one step of the budget
    assert [r["budget_s"] for r in records] == [float(i) for i in range(1, 12)]  # evaluations paused the clock
    assert load_checkpoint(tmp_path / "run" / "last").metadata["budget_done_s"] >= cfg.max_time
    # a step slower than the one before runs past the budget: the run stops at that step too
    clock = StepClock(1.0)
    slow = tiny(tmp_path, corpus, out_dir=str(tmp_path / "slow"), max_time=4.5, eval_interval=100)
    original = clock.__call__

    def sometimes_slow() -> float:
        clock.now += 3.0 if clock.now == 2.0 else 0.0  # the step after the first lasts 4 s
        return original()

    result = train(slow, progress=False, clock=sometimes_slow)
    assert result.step == 2 and train_records(tmp_path / "slow")[-1]["budget_s"] == 5.0


def test_the_schedule_follows_the_budget_and_ends_at_the_final_lr(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, max_time=10.0)
    train(cfg, progress=False, clock=StepClock(1.0))
    lrs = [r["lr"] for r in train_records(tmp_path / "run")]
    # step k ends at k seconds: fraction k/10; warmup to 0.2, stable to 0.7, linear decay to min_lr at 1.0
    expected = [lr_at_fraction((k - 1 + (1 if k > 1 else 0)) / 10, cfg) for k in range(1, 11)]
    assert lrs == pytest.approx(expected)
    assert lrs[-1] == cfg.min_lr and max(lrs) == cfg.lr
    assert lrs[2:7] == [cfg.lr] * 5 and lrs[6] > lrs[7] > lrs[8] > lrs[9]
    # the schedule by fraction: warmup from 0, min_lr at the end of the budget for wsd and cosine
    assert lr_at_fraction(0.0, cfg) == 0.0 and lr_at_fraction(0.2, cfg) == cfg.lr
    assert lr_at_fraction(1.0, cfg) == cfg.min_lr and lr_at_fraction(1.0, cfg.replace(schedule="cosine")) == \
        pytest.approx(cfg.min_lr)
    assert lr_at_fraction(0.5, cfg.replace(schedule="constant")) == cfg.lr


@pytest.mark.parametrize("optim", [{}, dict(optimizer="muon", adamw_lr_ratio=3.0, muon_momentum=0.9)],
                         ids=["adamw", "muon_own_lrs"])
def test_a_resumed_budgeted_run_continues_with_the_remaining_budget_bit_for_bit(tmp_path, corpus, optim):
    kw = dict(dropout=0.1, grad_accum_steps=2, **optim)
    full = train(tiny(tmp_path, corpus, out_dir=str(tmp_path / "full"), **kw), progress=False, clock=StepClock())
    cfg = tiny(tmp_path, corpus, out_dir=str(tmp_path / "part"), **kw)
    first = train(cfg, stop_at=6, progress=False, clock=StepClock())  # past an evaluation (step 4)
    assert first.interrupted == "stop_at" and first.step == 6
    state = load_train_state(tmp_path / "part" / "last")
    assert state["budget_used_s"] == 6.0 and state["budget_last_step_s"] == 1.0
    with pytest.raises(ConfigError, match="stopped at step 6;"):
        train(cfg, progress=False, clock=StepClock())  # starting it again would lose the 6 s trained
    resumed = train(cfg, resume=tmp_path / "part" / "last", progress=False, clock=StepClock())  # a new process' clock
    assert resumed.step == full.step == 11  # the remaining 4.5 s of budget
    assert first.losses + resumed.losses == full.losses
    assert [r["lr"] for r in train_records(tmp_path / "part")] == [r["lr"] for r in train_records(tmp_path / "full")]
    a, b = load_checkpoint(tmp_path / "full" / "last").model, load_checkpoint(tmp_path / "part" / "last").model
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    # a finished budget is not trained again; a larger one trains on
    again = train(cfg, resume=tmp_path / "part" / "last", progress=False, clock=StepClock())
    assert again.already_finished and again.step == 11
    longer = train(cfg.replace(max_time=13.0), resume=tmp_path / "part" / "last", progress=False, clock=StepClock())
    assert longer.step == 13 and not longer.already_finished


def test_budget_counts_only_steps():
    clock = StepClock(2.0)
    budget = Budget(10.0, clock, used_s=4.0, last_step_s=1.0)  # resumed: 4 s used, its last step 1 s
    assert budget.plan() == (0.5, False)
    assert not budget.step_done() and budget.used_s == 6.0 and budget.last_step_s == 2.0
    budget.resume_clock()  # a pause: its 2 s are not counted
    assert budget.plan() == (0.8, False) and not budget.step_done() and budget.used_s == 8.0
    assert budget.plan() == (1.0, True) and budget.step_done()
    assert budget.state_dict() == {"budget_used_s": 10.0, "budget_last_step_s": 2.0}


def test_time_budget_settings(tmp_path):
    assert [parse_duration(t) for t in ("90", "90s", "5m", "5 min", "1h", "1.5h", ".5m")] == \
        [90.0, 90.0, 300.0, 300.0, 3600.0, 5400.0, 30.0]
    assert parse_value("max_time", "5m") == 300.0 and parse_value("max_time", "300") == 300.0
    toml = tmp_path / "budget.toml"
    toml.write_text('[run]\nmax_time = "2m"\n')
    assert read_toml(toml)["max_time"] == "2m" and load_config(str(toml)).max_time == 120.0
    assert TrainConfig(max_time=45).max_time == 45.0
    for bad in ("5x", "m", "-1"):
        with pytest.raises(ConfigError, match="max_time"):
            TrainConfig(max_time=bad if bad != "-1" else -1)
    with pytest.raises(ConfigError, match="warmup_fraction"):
        TrainConfig(warmup_fraction=1.0)


def test_the_time_option_on_the_command_line(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "simplegpt", "train", "--time", "5 weeks"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert bad.returncode != 0 and "max_time must be seconds or a duration" in bad.stderr
    assert "Traceback" not in bad.stderr
    from simplegpt.cli import build_parser

    args = build_parser().parse_args(["train", "--time", "90s"])
    assert args.max_time == 90.0


def test_max_iters_on_the_command_line_replaces_a_files_time_budget():
    speedrun = load_config("speedrun_cpu")
    assert speedrun.max_time == 300.0 and speedrun.schedule == "wsd"
    steps = load_config("speedrun_cpu", {"max_iters": 50})
    assert steps.max_time == 0.0 and steps.max_iters == 50
    assert load_config("speedrun_cpu", {"max_iters": 50, "max_time": 60.0}).max_time == 60.0


def test_the_speedrun_model_exports_to_hugging_face_and_to_gguf(tmp_path, corpus):
    """The speedrun recipe's model (a tiny budgeted run of configs/speedrun_cpu.toml, its own shape) is a
    GPT2LMHeadModel for export-hf, and export-gguf writes a file the gguf package reads or refuses in
    one line that says why (not a traceback)."""
    from transformers import GPT2LMHeadModel

    cfg = load_config("speedrun_cpu", dict(data=str(corpus), data_dir=str(tmp_path / "data"), max_time=3.0,
                                           out_dir=str(tmp_path / "run"), eval_interval=1000, sample_tokens=0,
                                           num_threads=1, plot=False, tensorboard=False, peak_flops=1e12))
    assert (cfg.optimizer, cfg.n_layer, cfg.n_embd) == ("muon", 4, 128)
    result = train(cfg, progress=False, clock=StepClock(1.0))
    assert result.step == 3
    best = tmp_path / "run" / "best"

    def simplegpt(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "simplegpt", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)

    hf = simplegpt("export-hf", str(best), str(tmp_path / "hf"))
    assert hf.returncode == 0 and "Traceback" not in hf.stderr, hf.stderr
    ids = torch.tensor([[1, 5, 9, 14, 2, 7]])
    ours = load_checkpoint(best).model.eval()
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids)[0], atol=1e-4, rtol=1e-4)

    gguf_file = tmp_path / "speedrun.gguf"
    proc = simplegpt("export-gguf", str(best), str(gguf_file))
    assert "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode == 0:  # written: a GPT-2 GGUF of the model's tensors
        import gguf

        reader = gguf.GGUFReader(gguf_file)
        arch = reader.fields["general.architecture"]
        assert bytes(arch.parts[arch.data[0]]).decode() == "gpt2"
        assert len(reader.tensors) >= 4 * cfg.n_layer
    else:  # refused: one line naming what it cannot write, and no file
        [line] = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and line.startswith("simplegpt export-gguf: error: ") and not gguf_file.exists()


def test_the_gpu_recipe_loads_and_trains_on_a_cpu_with_overrides(tmp_path, corpus):
    """configs/speedrun_gpu.toml (unmeasured: no GPU here) is the CPU recipe scaled to nanoGPT's GPU shape;
    with a CPU's overrides and a small shape it trains its budget's steps with Muon and the wsd schedule."""
    gpu = load_config("speedrun_gpu")
    assert (gpu.n_layer, gpu.n_head, gpu.n_embd, gpu.block_size) == (6, 6, 384, 256)
    assert (gpu.optimizer, gpu.schedule, gpu.max_time, gpu.dtype, gpu.compile) == ("muon", "wsd", 300.0, "auto", True)
    cfg = load_config("speedrun_gpu", dict(data=str(corpus), data_dir=str(tmp_path / "data"), device="cpu",
                                           compile=False, n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4,
                                           max_time=2.0, eval_interval=1000, eval_iters=1, sample_tokens=0,
                                           out_dir=str(tmp_path / "run"), num_threads=1, plot=False,
                                           tensorboard=False, peak_flops=1e12))
    result = train(cfg, progress=False, clock=StepClock(1.0))
    assert result.step == 2 and all(map(torch.isfinite, torch.tensor(result.losses)))
    lrs = [r["lr"] for r in train_records(tmp_path / "run")]
    assert lrs[-1] == cfg.min_lr == 0.0


def test_the_short_recipe_trains_its_budget_with_its_own_lrs(tmp_path, corpus):
    """configs/speedrun_cpu_short.toml: the speedrun for a budget of seconds (1 block, Muon at a higher
    lr and momentum 0.9, its AdamW half at twice the lr); a run of it ends its budget at min_lr with the
    AdamW groups at adamw_lr_ratio x the schedule's lr."""
    short = load_config("speedrun_cpu_short")
    assert (short.n_layer, short.n_embd, short.optimizer, short.schedule) == (1, 128, "muon", "wsd")
    assert (short.muon_momentum, short.adamw_lr_ratio) == (0.9, 2.0) and 0 < short.max_time < 60
    cfg = load_config("speedrun_cpu_short", dict(data=str(corpus), data_dir=str(tmp_path / "data"), n_layer=1,
                                                 n_head=2, n_embd=16, block_size=16, batch_size=4, max_time=4.0,
                                                 eval_interval=1000, eval_iters=1, log_interval=1, sample_tokens=0,
                                                 out_dir=str(tmp_path / "run"), num_threads=1, plot=False,
                                                 tensorboard=False, peak_flops=1e12))
    result = train(cfg, progress=False, clock=StepClock(1.0))
    assert result.step == 4 and all(map(torch.isfinite, torch.tensor(result.losses)))
    groups = load_train_state(tmp_path / "run" / "last")["optimizer"]["param_groups"]
    assert [g["momentum"] for g in groups if g["optimizer"] == "muon"] == [0.9]
    assert [r["lr"] for r in train_records(tmp_path / "run")][1] == cfg.lr  # the schedule's lr: Muon's


def test_the_speedrun_bench_names_nanogpts_iterations_and_its_ablations(capsys):
    """bench/speedrun.py: nanoGPT's own run was reported as "2000 iterations" whatever --nanogpt-args set;
    each ablation changes the recipe in one way and prints a markdown row."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("speedrun_bench", ROOT / "bench" / "speedrun.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.nanogpt_iters([]) == 2000
    assert bench.nanogpt_iters(["--max_iters=20", "--lr_decay_iters=20"]) == 20
    bench.report({"nanogpt_itself": {1: {"wall_s": 3.0, "loss": 2.5, "iters": 20, "time_to_target": None}}}, 1,
                 [60.0, 300.0])
    assert "20 iterations in 3.0 s" in capsys.readouterr().out
    # a 10 s recipe's curve is read at 2 s and 10 s (not 60 s and 300 s); before its first evaluation it has none
    curve = [(3.0, 2.5), (10.5, 1.9)]
    marks = [0.2 * 10.0, 10.0]
    speedrun = {"curve": curve, "time_to_target": None, "final_loss": 1.9, "steps": 5, "tokens": 10_240,
                "tok_per_s": 2000.0, **{bench.loss_key(m): bench.loss_at(curve, m) for m in marks}}
    bench.report({"speedrun": {1: speedrun}}, 1, marks)
    out = capsys.readouterr().out
    assert "loss after 2 s - (before the first evaluation), after 10 s 1.9400 nats/char" in out, out
    base = load_config("speedrun_cpu")
    changes = {name: change(base) for name, (_, change) in bench.ABLATIONS.items()}
    assert changes["lr_x2"]["lr"] == 2 * base.lr and changes["lr_half"]["lr"] == base.lr / 2
    assert changes["adamw"]["optimizer"] == "adamw" and changes["batch12"] == {"batch_size": 12}
    assert changes["no_wsd"] == {"schedule": "cosine", "max_time": 0.0}
    assert changes["rotary_rmsnorm"] == {"positions": "rotary", "norm": "rmsnorm"}
    for change in changes.values():
        load_config("speedrun_cpu", {"max_iters": 10, **change} if "max_time" in change else change)  # valid keys
    run = {"time_to_target": None, "final_loss": 2.0, "steps": 5, "tokens": 10_240, "tok_per_s": 2000.0}
    bench.ablation_rows({"speedrun": {7: run}, "ablation:batch12": {7: {**run, "time_to_target": 90.0}}}, 7,
                        ["speedrun", "ablation:batch12"])
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 7 |")]
    assert rows == ["| 7 | the speedrun recipe | not reached | 2.0000 | 5 | 10,240 | 2,000 |",
                    "| 7 | nanoGPT's batch 12 | 90 | 2.0000 | 5 | 10,240 | 2,000 |"]


def test_every_option_of_the_speedrun_bench_says_what_it_does():
    """bench/speedrun.py --help listed --data, --seeds, --config, --threads, --json, --png and --quiet
    with no word on them (--config's accepting a built-in name such as speedrun_cpu_short included)."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("speedrun_bench", ROOT / "bench" / "speedrun.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    parser = bench.build_parser()
    assert [a.dest for a in parser._actions if not a.help] == []
    assert "speedrun_cpu_short" in parser.format_help()
    args = parser.parse_args(["--config", "speedrun_cpu_short", "--seeds", "1"])
    assert load_config(args.config).max_time == load_config("speedrun_cpu_short").max_time and args.budget is None


def test_a_finished_budgeted_run_resumed_with_a_smaller_budget_is_told_a_larger_one(tmp_path, corpus, capsys):
    """--resume RUN --time 2s of a run that trained its 4 s: nothing is trained, and the advice to train
    longer named twice the 2 s given (4 s, which trains nothing either), not twice the 4 s used."""
    from simplegpt.cli import main

    train(tiny(tmp_path, corpus, max_time=4.0, eval_interval=1000), progress=False, clock=StepClock(1.0))
    assert main(["train", "--resume", str(tmp_path / "run"), "--time", "2s", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "had already finished its 4 steps" in err and "--max_time 8)" in err, err
