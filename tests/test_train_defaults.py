"""What a run on a user's own data gets by default, and what it says: folders and a sample prompt that
follow the data (not the quick start's Shakespeare), every setting checked before step 1, checkpoints
before samples, a finished run not trained again, non-finite gradients never applied, an MFU that
never exceeds 100%, an estimate of the time, a warning for a run that repeats its text, and plain
progress lines off a terminal."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simplegpt.checkpoint import load_checkpoint
from simplegpt.config import load_config
from simplegpt.errors import ConfigError
from simplegpt.training import TrainingError
from simplegpt.training.loop import train
from simplegpt.training import loop
from simplegpt.training.hardware import cpu_vector_peak, device_peak_flops

# a corpus without the letters of the quick start's "HAMLET:" prompt
WORDS = "the cat sat on a mat and ran far away from every dog in town".split()


@pytest.fixture
def corpus(tmp_path) -> Path:
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(len(WORDS), (6000,), generator=gen).tolist()
    path = tmp_path / "notes.txt"
    path.write_text("\n".join(" ".join(WORDS[i] for i in picks[j:j + 12]) for j in range(0, len(picks), 12)))
    return path


TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_iters=2, log_interval=1,
            warmup_iters=2, num_threads=1, plot=False, tensorboard=False, peak_flops=1e12)


def tiny(tmp_path, corpus, **kw):
    """The built-in config with --data and tiny settings, as the command line builds it."""
    return load_config(None, {"data": str(corpus), "data_dir": str(tmp_path / "data"),
                              "out_dir": str(tmp_path / "run"), "max_iters": 4, "eval_interval": 2, **TINY, **kw})


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "simplegpt", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def tiny_args(**kw):
    values = {**TINY, "max_iters": 4, "eval_interval": 2, **kw}
    return [a for k, v in values.items() for a in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


def test_other_data_gets_its_own_folders_and_no_shakespeare_prompt(tmp_path, corpus):
    quick = load_config()
    assert (quick.out_dir, quick.data_dir, quick.sample_prompt) == ("out/shakespeare_char", "data/shakespeare_char",
                                                                    "HAMLET:\n")
    mine = load_config(None, {"data": "notes.txt"})
    assert (mine.out_dir, mine.data_dir, mine.sample_prompt) == ("out/notes_char", "", "")
    assert load_config(None, {"data": "notes.txt", "tokenizer": "byte"}).out_dir == "out/notes_byte"
    # what is given stays
    given = load_config(None, {"data": "notes.txt", "out_dir": "runs/a", "sample_prompt": "the"})
    assert (given.out_dir, given.sample_prompt) == ("runs/a", "the")
    # the whole way through: the corpus has no 'H', so the quick start's prompt would fail at step 2
    proc = cli("train", "--data", corpus.name, *tiny_args(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(tmp_path / "out" / "notes_char" / "best").metadata["step"] > 0
    assert (tmp_path / "data" / "notes_char" / "meta.json").is_file()
    assert not (tmp_path / "out" / "shakespeare_char").exists() and not (tmp_path / "data" / "shakespeare_char").exists()


def test_a_fine_tune_gets_a_folder_of_its_own(tmp_path, corpus):
    # the README's order: a run on the data, then a fine-tune from it without --out_dir
    assert load_config(None, {"data": "data/mine", "init_from": "out/gpt2"}).out_dir == "out/mine_from_gpt2"
    assert load_config(None, {"init_from": "out/notes_char/best"}).out_dir == "out/shakespeare_from_notes_char"
    first = cli("train", "--data", corpus.name, *tiny_args(), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    tune = cli("train", "--init-from", "out/notes_char/best", "--data", corpus.name, *tiny_args(), cwd=tmp_path)
    assert tune.returncode == 0, tune.stderr
    assert load_checkpoint(tmp_path / "out" / "notes_from_notes_char" / "last").metadata["step"] == 4
    assert load_checkpoint(tmp_path / "out" / "notes_char" / "last").metadata["train_config"]["init_from"] == ""


def test_an_lr_alone_scales_the_files_min_lr_with_it():
    # the file's 2e-3 -> 2e-4: --lr 1e-4 alone (the README's fine-tune) would put min_lr above lr
    # (shakespeare_char, the default before the speedrun recipe, whose min_lr is 0)
    assert load_config("shakespeare_char", {"lr": 1e-4}).min_lr == pytest.approx(1e-5)
    assert load_config("shakespeare_char", {"lr": 1e-4, "min_lr": 0.0}).min_lr == 0.0
    assert load_config("shakespeare_char").min_lr == 2e-4
    assert load_config(None, {"lr": 1e-4}).min_lr == 0.0  # the speedrun recipe decays to 0
    assert load_config(None, {"lr": 1e-4, "min_lr": 1e-5}).min_lr == 1e-5


def test_a_sample_prompt_outside_the_vocabulary_is_refused_before_step_1(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, sample_prompt="HAMLET:\n")
    with pytest.raises(ConfigError, match=r"sample_prompt 'HAMLET:\\n' does not fit .*'H'.*--sample_prompt ''"):
        train(cfg, progress=False, log=lambda s: None)
    assert not (tmp_path / "run").exists()  # nothing started, nothing left behind
    proc = cli("train", "--data", str(corpus), "--sample_prompt", "HAMLET:", *tiny_args(), "--quiet", cwd=tmp_path)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "does not fit" in proc.stderr


def test_each_evaluation_saves_the_checkpoint_before_the_sample(tmp_path, corpus, monkeypatch):
    def failing_sample(*args, **kw):
        raise RuntimeError("the sample failed")

    monkeypatch.setattr(loop, "sample_text", failing_sample)  # fault injection: the optional part fails
    with pytest.raises(RuntimeError, match="the sample failed"):
        train(tiny(tmp_path, corpus, sample_tokens=8), progress=False, log=lambda s: None)
    assert load_checkpoint(tmp_path / "run" / "last").metadata["step"] == 2  # the steps are not lost
    assert (tmp_path / "run" / "best").is_dir()


def test_a_finished_run_is_not_trained_again_unless_overwrite(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus)
    done = train(cfg, progress=False, log=lambda s: None)
    assert not done.already_finished
    last = tmp_path / "run" / "last" / "model.safetensors"
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    stamp = last.stat().st_mtime_ns
    again = train(cfg, progress=False, log=lambda s: None)
    assert again.already_finished and again.step == 4 and again.val_loss == done.val_loss
    assert last.stat().st_mtime_ns == stamp and (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    assert not train(cfg, overwrite=True, progress=False, log=lambda s: None).already_finished
    assert last.stat().st_mtime_ns != stamp
    # the command says so, and how to go on
    args = ["--data", str(corpus), "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "run"),
            *tiny_args(), "--quiet"]
    proc = cli("train", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "had already finished its 4 steps" in proc.stderr and "--overwrite" in proc.stderr
    assert "--max_iters 8" in proc.stderr
    assert "steps: 4/4" in proc.stdout


def _inf_grad_at(monkeypatch, at_step: int) -> None:
    """Fault injection: from optimizer step at_step on, one parameter's gradient is infinite (the loss
    stays finite)."""
    make = loop.make_optimizer

    def make_optimizer(model, *args, **kw):
        opt = make(model, *args, **kw)
        calls = [0]

        def poison(p):
            calls[0] += 1
            if calls[0] >= at_step:
                p.grad[0, 0] = math.inf

        model.transformer.wte.weight.register_post_accumulate_grad_hook(poison)
        return opt

    monkeypatch.setattr(loop, "make_optimizer", make_optimizer)


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_gradient_norm_stops_the_run_before_it_is_applied(tmp_path, corpus, monkeypatch, fused):
    _inf_grad_at(monkeypatch, 3)
    cfg = tiny(tmp_path, corpus, eval_interval=2, max_iters=10, fused=fused)
    with pytest.raises(TrainingError, match=r"gradient norm became inf at step 3 .* not applied") as e:
        train(cfg, progress=False, log=lambda s: None)
    assert f"{tmp_path / 'run' / 'last'} keeps the last good state" in str(e.value)
    ck = load_checkpoint(tmp_path / "run" / "last")
    assert ck.metadata["step"] == 2 and all(torch.isfinite(p).all() for p in ck.model.parameters())


def test_a_fault_before_the_first_checkpoint_names_no_checkpoint(tmp_path, corpus, monkeypatch):
    _inf_grad_at(monkeypatch, 2)
    with pytest.raises(TrainingError, match="no checkpoint was saved") as e:
        train(tiny(tmp_path, corpus, eval_interval=5, max_iters=10), progress=False, log=lambda s: None)
    assert "last" not in str(e.value) and not (tmp_path / "run" / "last").exists()


def test_mfu_never_exceeds_100_percent(tmp_path, corpus):
    # a peak set (or measured under load) far too low
    train(tiny(tmp_path, corpus, peak_flops=1.0, eval_interval=4), progress=False, log=lambda s: None)
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in records if r["kind"] == "train"]
    assert mfus and all(0 < m <= 1.0 for m in mfus)


def test_the_cpu_peak_is_never_below_what_the_cores_can_do():
    vector = cpu_vector_peak(2)
    if vector is None:
        pytest.skip("no x86 flags or clock in /proc/cpuinfo")
    assert vector[0] == 2 * cpu_vector_peak(1)[0] and "FLOPs/cycle" in vector[1]
    from simplegpt.config import TrainConfig

    flops, basis = device_peak_flops(TrainConfig(), torch.device("cpu"), 2)
    assert flops >= vector[0] and basis.startswith("the float32 peak of 2 cores")


def test_the_start_says_how_long_and_warns_of_a_run_that_repeats_its_text(tmp_path, corpus):
    logged: list[str] = []
    # 22,015 training characters, 64 per step: 20 passes are 6,879 steps
    cfg = tiny(tmp_path, corpus, max_iters=20_000, eval_interval=10_000, sample_tokens=0)
    train(cfg, stop_at=6, progress=False, log=logged.append)
    [warning] = [s for s in logged if s.startswith("warning:")]
    assert "go over the" in warning and " times" in warning and "--max_iters 6879 for 20 passes" in warning
    [estimate] = [s for s in logged if s.startswith("estimated time: ~")]
    assert "for the 19,996 steps left and 2 evaluations" in estimate
    assert logged.index(warning) < logged.index(estimate)
    assert "1 thread;" in logged[0]
    short: list[str] = []
    train(tiny(tmp_path, corpus, out_dir=str(tmp_path / "short"), max_iters=50), progress=False, log=short.append)
    assert not any(s.startswith("warning:") for s in short)


def test_off_a_terminal_progress_is_plain_lines_and_the_summary_names_best_and_last(tmp_path, corpus):
    prep = cli("prepare", str(corpus), "-o", str(tmp_path / "data"), "--quiet", cwd=tmp_path)
    assert prep.returncode == 0, prep.stderr
    proc = cli("train", "--data", str(tmp_path / "data"), "--out_dir", "run", *tiny_args(max_iters=6), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "step 6/6  loss " in proc.stderr, proc.stderr
    assert f"checkpoint: {Path('run') / 'last'}" in proc.stdout and f"best: {Path('run') / 'best'}" in proc.stdout
    assert "MFU (model FLOPs utilization) is against the configured peak_flops" in proc.stdout


def _recipe_values(cfg) -> dict:
    """The keys a speedrun recipe file sets (its run folder aside), as cfg has them."""
    from simplegpt.config import read_toml, resolve_config_path

    keys = set(read_toml(resolve_config_path("speedrun_cpu"))) | set(read_toml(resolve_config_path("speedrun_gpu")))
    return {k: getattr(cfg, k) for k in sorted(keys - {"out_dir", "data_dir", "sample_prompt", "data"})}


def test_the_default_is_the_machines_speedrun_recipe_with_a_time_budget(monkeypatch):
    """Issue 24: `simplegpt train` and `simplegpt train --data my_texts/` trained 600 AdamW steps of a fixed
    config; they get the speedrun recipe of the machine, for 5 minutes."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = load_config("speedrun_cpu")
    for default in (load_config(), load_config(None, {"data": "my_texts/"})):
        assert _recipe_values(default) == _recipe_values(cpu)
        assert default.max_time == 300.0 and default.optimizer == "muon" and default.schedule == "wsd"
    assert load_config().out_dir == "out/shakespeare_char"  # the README's commands read the run there
    assert load_config(None, {"data": "my_texts/"}).out_dir == "out/my_texts_char"
    # a GPU gets the GPU recipe: nanoGPT's GPU shape, bf16 (dtype auto) and compile
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = load_config()
    assert _recipe_values(gpu) == _recipe_values(load_config("speedrun_gpu"))
    assert (gpu.n_layer, gpu.n_embd, gpu.block_size, gpu.compile, gpu.optimizer) == (6, 384, 256, True, "muon")
    assert gpu.max_time == 300.0 and gpu.out_dir == "out/shakespeare_char"
    assert _recipe_values(load_config(None, {"device": "cpu"})) == _recipe_values(cpu)  # the device trained on
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_config(None, {"device": "cuda:1"}).n_embd == 384


def test_explicit_steps_or_time_win_over_the_default_budget():
    steps = load_config(None, {"max_iters": 40})
    assert steps.max_time == 0.0 and steps.max_iters == 40 and steps.warmup_iters == 4  # iterations, fitted warmup
    assert load_config(None, {"max_iters": 40, "max_time": 60.0}).max_time == 60.0
    assert load_config(None, {"max_time": 30.0}).max_time == 30.0
    import simplegpt.commands.train as command
    from simplegpt.config import KEYS

    assert "--max_iters N without --time trains N steps instead" in command.DESCRIPTION  # --help says how
    assert "replaces the config file's budget" in KEYS["max_iters"].help


@pytest.mark.parametrize("given, why", [({"parallel": "fsdp"}, "FSDP2"), ({"lora": 8, "init_from": "x"}, "LoRA"),
                                        ({"init_from": "out/gpt2"}, "fine-tune")])
def test_runs_muon_cannot_serve_fall_back_to_adamw_unless_an_optimizer_is_named(given, why):
    from simplegpt.config import adamw_fallback

    cfg = load_config(None, given)
    assert (cfg.optimizer, cfg.lr, cfg.min_lr) == ("adamw", 2e-3, 2e-4) and why in adamw_fallback(given)
    assert load_config(None, {**given, "lr": 1e-4}).min_lr == pytest.approx(1e-5)  # the ratio kept
    assert load_config(None, {**given, "optimizer": "muon"}).optimizer == "muon"  # named: FSDP2/LoRA refuse it
    assert load_config("speedrun_cpu", given).optimizer == "muon"  # a config file chosen is used as written
    assert load_config(None, {"sft": "chats.jsonl", "init_from": "x"}).optimizer == "adamw"
    assert load_config(None, {"sft": "chats.jsonl", "init_from": "x"}).max_time == 0.0  # sft's 300 steps


def test_fsdp_on_the_default_says_it_trains_with_adamw(tmp_path, corpus):
    """A plain process given parallel = 'fsdp' trains one process (test_train.py): on the default recipe
    it was refused (Muon); it now trains with AdamW and says so in one line."""
    proc = cli("train", "--data", str(corpus), "--parallel", "fsdp", *tiny_args(max_iters=2), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [note] = [ln for ln in proc.stdout.splitlines() if "Muon" in ln]
    assert note.startswith("note: parallel = 'fsdp' (FSDP2 cannot run Muon)") and "AdamW (lr 0.002)" in note
    saved = load_checkpoint(tmp_path / "out" / "notes_char" / "last").metadata["train_config"]
    assert saved["optimizer"] == "adamw"


@pytest.mark.parametrize("tokenizer", ["char", "bpe:300"])
def test_train_on_my_data_runs_the_recipe_for_its_time(tmp_path, corpus, tokenizer):
    """`simplegpt train --data notes.txt` with a tiny budget: the recipe's Muon and schedule, the run ends
    with its time (not a count of steps), the progress and the estimate speak of the budget; a subword
    vocabulary gets the same recipe. The shape is shrunk so that the test is quick."""
    small = {k: v for k, v in TINY.items() if k not in ("warmup_iters",)}
    args = [a for k, v in {**small, "eval_interval": 1000}.items()
            for a in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]
    proc = cli("train", "--data", corpus.name, "--tokenizer", tokenizer, "--time", "5s", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "out" / f"notes_{tokenizer.replace(':', '')}"
    ck = load_checkpoint(run / "last")
    saved = ck.metadata["train_config"]
    assert (saved["optimizer"], saved["schedule"], saved["max_time"]) == ("muon", "wsd", 5.0)
    assert ck.metadata["budget_done_s"] >= 5.0
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert len(lrs) > 1 and lrs[-1] < max(lrs)  # decaying at the end (to 0 exactly: tests/test_time_budget.py)
    assert "time budget: " in proc.stdout and " budget  loss " in proc.stderr  # estimate and progress in time
    assert "steps: " in proc.stdout and "steps: " + str(ck.metadata["step"]) + "/" not in proc.stdout
