import json
import math
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from simplegpt.checkpoint import load_checkpoint, load_train_state
from simplegpt.config import TrainConfig, load_config, parse_value, read_toml, to_toml
from simplegpt.errors import CheckpointError, ConfigError, DataError
from simplegpt.model import GPT, GPTConfig
from simplegpt.training import TrainingError
from simplegpt.training.loop import train
from simplegpt.training.optimizer import lr_at, param_groups

from conftest import ONE_STEP, SPLITS, assert_same_steps, first_step, split, uneven_texts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def corpus(tmp_path, shakespeare_path):
    path = tmp_path / "corpus.txt"
    path.write_text(shakespeare_path.read_text()[:60_000])
    return path


def tiny(tmp_path, corpus, **kw) -> TrainConfig:
    base = dict(data=str(corpus), data_dir=str(tmp_path / "data"), n_layer=1, n_head=2, n_embd=16, block_size=16,
                batch_size=4, max_iters=8, eval_interval=4, eval_iters=2, log_interval=1, warmup_iters=2,
                sample_tokens=8, out_dir=str(tmp_path / "run"), num_threads=1, plot=False, tensorboard=False,
                peak_flops=1e12)
    return TrainConfig(**{**base, **kw})


def train_losses(run: Path) -> list[float]:
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_lr_warms_up_then_decays_for_cosine_and_wsd():
    cfg = TrainConfig(max_iters=100, warmup_iters=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[9] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(1e-4)
    wsd = cfg.replace(schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, wsd) for s in range(100)]
    assert lrs[10:80] == [1e-3] * 70 and all(a > b for a, b in zip(lrs[80:], lrs[81:]))
    assert lrs[-1] == pytest.approx(1e-4)


@pytest.mark.parametrize("schedule, max_iters, warmup_iters", [("wsd", 3, 0), ("wsd", 5, 1), ("cosine", 3, 2)])
def test_the_last_step_runs_at_min_lr_when_the_decay_is_one_step_long(schedule, max_iters, warmup_iters):
    """A decay of a single step (a short run: wsd's decay_fraction of it rounds to 1 step, or cosine
    right after the warmup) still ends at min_lr; it used to run that step at lr."""
    cfg = TrainConfig(max_iters=max_iters, warmup_iters=warmup_iters, lr=1e-3, min_lr=1e-4, schedule=schedule,
                      decay_fraction=0.3)
    assert lr_at(max_iters - 1, cfg) == pytest.approx(1e-4)
    assert lr_at(max_iters - 2, cfg) == pytest.approx(1e-3)


def test_weight_decay_skips_biases_norms_and_embeddings():
    model = GPT(GPTConfig(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    decay, no_decay = param_groups(model, 0.1, decay_embeddings=False)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {n for n, p in model.named_parameters() if p.dim() == 2 and "wte" not in n and "wpe" not in n}
    assert not any("bias" in n or "ln" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    decay, _ = param_groups(model, 0.1, decay_embeddings=True)
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= {names[id(p)] for p in decay["params"]}


def test_config_files_overrides_and_type_checks(tmp_path):
    cfg = load_config(None, {"lr": parse_value("lr", "3e-4"), "compile": parse_value("compile", "false")})
    assert cfg.lr == 3e-4 and cfg.out_dir == "out/shakespeare_char" and cfg.tokenizer == "char"
    assert load_config(str(ROOT / "configs" / "gpt2_124m.toml")).n_embd == 768
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(str(path)) == cfg
    with pytest.raises(ConfigError, match="unknown .*'lrr'"):
        load_config(None, {"lrr": 1.0})
    with pytest.raises(ConfigError, match="n_layer must be an integer"):
        parse_value("n_layer", "two")
    path.write_text("[optim]\nlr = 'fast'\n")
    with pytest.raises(ConfigError, match="lr must be a number"):
        load_config(str(path))
    path.write_text("[optimizer]\nlr = 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown table \[optimizer\]"):
        read_toml(path)
    with pytest.raises(ConfigError, match="divisible"):
        TrainConfig(n_embd=10, n_head=4)


def test_training_learns_and_writes_a_complete_run(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, n_embd=32, block_size=32, batch_size=8, max_iters=60, eval_interval=30, lr=3e-3,
               sample_prompt="ROMEO:\n", plot=True)
    logged: list[str] = []
    result = train(cfg, progress=False, log=logged.append)
    run = Path(cfg.out_dir)
    assert f"loss curve: {run / 'loss.png'}" in logged
    start = next(line for line in logged if line.startswith("model: "))
    assert " parameters, 1 layer, 32 wide," in start and ", 1 thread" in start  # not "1 layers"
    losses = train_losses(run)
    assert len(losses) == 60 and sum(losses[-10:]) / 10 < losses[0] - 0.8
    assert {"config.toml", "metrics.jsonl", "samples.txt", "last", "best", "loss.png"} <= {p.name for p in run.iterdir()}
    assert read_toml(run / "config.toml") == cfg.to_dict()
    ck = load_checkpoint(run / "last")
    assert ck.metadata["step"] == 60 and ck.tokenizer is not None
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert result.val_bpb == pytest.approx(result.val_loss / (math.log(2) * meta["val_bytes_per_token"]))
    assert ck.metadata["metrics"]["val_loss"] == result.val_loss
    assert (run / "samples.txt").read_text().count("ROMEO:\n") == 2
    assert load_checkpoint(run / "best").metadata["metrics"]["val_loss"] == result.best_val_loss


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, corpus):
    # dropout and gradient accumulation make the RNG and sampler state matter
    kw = dict(dropout=0.1, grad_accum_steps=2, max_iters=9)
    full = train(tiny(tmp_path, corpus, out_dir=str(tmp_path / "full"), **kw), progress=False)
    cfg = tiny(tmp_path, corpus, out_dir=str(tmp_path / "part"), **kw)
    first = train(cfg, stop_at=5, progress=False)
    assert first.interrupted == "stop_at" and first.step == 5
    with pytest.raises(ConfigError, match="stopped at step 5/9"):
        train(cfg, progress=False)  # starting the same run again would throw the 5 steps away
    assert load_train_state(tmp_path / "part" / "last")["step"] == 5
    resumed = train(cfg, resume=tmp_path / "part" / "last", progress=False)
    assert resumed.step == 9
    assert train_losses(tmp_path / "part") == train_losses(tmp_path / "full")
    assert first.losses + resumed.losses == full.losses
    a, b = load_checkpoint(tmp_path / "full" / "last").model, load_checkpoint(tmp_path / "part" / "last").model
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_refuses_other_shape_and_damaged_checkpoints(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, max_iters=4)
    train(cfg, progress=False)
    last = tmp_path / "run" / "last"
    with pytest.raises(ConfigError, match="n_embd"):
        train(cfg.replace(n_embd=32, max_iters=6), resume=last, progress=False)
    with pytest.raises(ConfigError, match="tokenizer"):
        train(cfg.replace(tokenizer="byte", max_iters=6), resume=last, progress=False)
    # another optimizer cannot take the saved one's state: said as such, not as a damaged file
    with pytest.raises(ConfigError, match="optimizer='muon': the checkpoint has optimizer='adamw'"):
        train(cfg.replace(optimizer="muon", max_iters=6), resume=last, progress=False)
    state = (last / "train_state.pt").read_bytes()
    (last / "train_state.pt").write_bytes(state[: len(state) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        train(cfg.replace(max_iters=6), resume=last, progress=False)
    weights = (last / "model.safetensors").read_bytes()
    (last / "model.safetensors").write_bytes(weights[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        train(cfg.replace(max_iters=6), resume=last, progress=False)


def test_out_dir_with_a_different_run_needs_overwrite(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, max_iters=4)
    train(cfg, progress=False)
    train(cfg, progress=False)  # the same run again is fine
    with pytest.raises(ConfigError, match="different run"):
        train(cfg.replace(lr=5e-4), progress=False)
    assert load_checkpoint(tmp_path / "run" / "last").metadata["train_config"]["lr"] == cfg.lr
    train(cfg.replace(lr=5e-4), overwrite=True, progress=False)
    assert load_checkpoint(tmp_path / "run" / "last").metadata["train_config"]["lr"] == 5e-4


def test_corpus_smaller_than_a_block_is_refused(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("tiny corpus " * 3)
    with pytest.raises(DataError, match="block_size"):
        train(tiny(tmp_path, small, block_size=32), progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, eval_interval=1, max_iters=2, sample_tokens=0)
    train(cfg, progress=False)
    good = (tmp_path / "run" / "last" / "model.safetensors").read_bytes()
    # an absurd learning rate blows the weights up on the next step
    bad = cfg.replace(max_iters=50, lr=1e30, min_lr=0.0, grad_clip=0.0)
    with pytest.raises(TrainingError, match="loss became nan"):
        train(bad, resume=tmp_path / "run" / "last", progress=False)
    ck = load_checkpoint(tmp_path / "run" / "last")
    assert ck.metadata["step"] == 2 and math.isfinite(ck.metadata["metrics"]["val_loss"])
    assert (tmp_path / "run" / "last" / "model.safetensors").read_bytes() == good


def test_init_from_a_checkpoint_keeps_weights_and_crops_the_block(tmp_path, corpus):
    base = tiny(tmp_path, corpus, block_size=32, max_iters=2, out_dir=str(tmp_path / "base"))
    train(base, progress=False)
    src = load_checkpoint(tmp_path / "base" / "last").model
    cfg = tiny(tmp_path, corpus, block_size=16, n_layer=3, init_from=str(tmp_path / "base" / "last"), max_iters=1,
               lr=1e-12, min_lr=0.0, warmup_iters=0, out_dir=str(tmp_path / "ft"))
    train(cfg, progress=False)
    ck = load_checkpoint(tmp_path / "ft" / "last")
    assert ck.config.n_positions == 16 and ck.config.n_layer == 1  # the shape comes from the checkpoint
    torch.testing.assert_close(ck.model.transformer.wpe.weight, src.transformer.wpe.weight[:16], atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="exceeds"):
        train(cfg.replace(block_size=64, out_dir=str(tmp_path / "ft2")), progress=False)


def test_padded_batch_mode_trains(tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"the cat sat on mat {i}"}) + "\n" for i in range(200)))
    result = train(tiny(tmp_path, texts, batch_mode="padded", block_size=32, max_iters=30, lr=3e-3), progress=False)
    losses = train_losses(tmp_path / "run")
    assert result.step == 30 and losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("cpu_shards", [1, 2])
def test_accumulation_weighs_padded_micro_batches_by_their_tokens(tmp_path, cpu_shards):
    # the same 8 rows of uneven lengths as 8x1, 4x2, 2x4 and 1x8: each micro-batch's mean loss weighs by its
    # tokens, so the step (loss, gradients) is the mean over all 8 rows' tokens whatever the split; the val
    # loss over 8 rows too
    texts = uneven_texts(tmp_path / "texts.jsonl")
    steps = []
    for batch_size, accum in SPLITS if cpu_shards == 1 else SPLITS[:3]:  # a core's share needs a row
        out = tmp_path / f"run{batch_size}x{accum}"
        train(tiny(tmp_path, texts, out_dir=str(out), cpu_shards=cpu_shards, num_threads=cpu_shards,
                   **split(batch_size, accum), **ONE_STEP), progress=False)
        steps.append(first_step(out))
    assert_same_steps(steps)


def _cli(*args, cwd, **kw):
    return subprocess.run([sys.executable, "-m", "simplegpt", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, **kw)


def test_fsdp_without_torchrun_says_the_run_is_one_process(tmp_path, corpus):
    """parallel = 'fsdp' in a plain 'simplegpt train' (no process group) trains one process, and says so."""
    logged: list[str] = []
    train(tiny(tmp_path, corpus, max_iters=2, eval_interval=2, parallel="fsdp"), progress=False, log=logged.append)
    assert [ln for ln in logged if ln.startswith("note: parallel = 'fsdp' applies under torchrun")], logged
    assert (tmp_path / "run" / "last" / "model.safetensors").is_file()  # a plain checkpoint, not dcp/ shards


def _tiny_args(tmp_path, corpus):
    return ["--data", str(corpus), "--data_dir", str(tmp_path / "data"), "--n_layer", "1", "--n_head", "2",
            "--n_embd", "16", "--block_size", "16", "--batch_size", "4", "--eval_iters", "2", "--peak_flops", "1e12",
            "--num_threads", "1", "--plot", "false", "--log_interval", "1", "--out_dir", str(tmp_path / "run"), "--quiet"]


@pytest.mark.parametrize("case", ["missing", "empty", "small", "unknown", "type", "resume_shape", "corrupt",
                                  "shards"])
def test_cli_bad_input_gives_one_line_and_exit_1(tmp_path, corpus, case):
    args = _tiny_args(tmp_path, corpus)
    if case in ("resume_shape", "corrupt"):
        assert _cli("train", *args, "--max_iters", "2", cwd=tmp_path).returncode == 0
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    small = tmp_path / "small.txt"
    small.write_text("abc")
    if case == "corrupt":
        (tmp_path / "run" / "last" / "model.safetensors").write_bytes(b"garbage")
    extra = {"missing": ["--data", str(tmp_path / "none.txt")], "empty": ["--data", str(empty)],
             "small": ["--data", str(small), "--data_dir", str(tmp_path / "d2")], "unknown": ["--lrr", "1"],
             "type": ["--lr", "fast"], "resume_shape": ["--resume", str(tmp_path / "run"), "--n_embd", "32"],
             "corrupt": ["--resume", str(tmp_path / "run")], "shards": ["--cpu_shards", "2", "--dropout", "0.1"]}[case]
    proc = _cli("train", *args, *extra, cwd=tmp_path)
    expected = {"missing": "not found", "empty": "empty", "small": "block_size", "unknown": "unrecognized arguments: --lrr",
                "type": "lr must be a number", "resume_shape": "n_embd", "corrupt": "truncated or corrupted",
                "shards": "cpu_shards > 1 needs"}[case]
    assert proc.returncode in (1, 2) and expected in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()  # one line, usage errors included
    assert line.startswith(("simplegpt train: error:", "simplegpt: error:"))
    if case in ("missing", "empty", "small", "unknown", "type", "shards"):
        assert not (tmp_path / "run").exists()  # a run that never started leaves no folder behind


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, corpus):
    args = _tiny_args(tmp_path, corpus) + ["--max_iters", "100000", "--eval_interval", "100000"]
    proc = subprocess.Popen([sys.executable, "-m", "simplegpt", "train", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    state = load_train_state(tmp_path / "run" / "last")
    assert 3 <= state["step"] < 100000
    assert f"--resume {tmp_path / 'run' / 'last'}" in out + err
    assert len(train_losses(tmp_path / "run")) == state["step"]


def test_cli_summary_names_the_checkpoint_and_a_working_generate_command(tmp_path, corpus):
    proc = _cli("train", *_tiny_args(tmp_path, corpus), "--max_iters", "3", "--eval_interval", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoint: {tmp_path / 'run' / 'last'}" in proc.stdout
    [hint] = [line for line in proc.stdout.splitlines() if line.startswith("next: simplegpt generate")]
    args = shlex.split(hint.removeprefix("next: simplegpt "))
    gen = _cli(*args, "--max-new-tokens", "5", "--quiet", cwd=tmp_path)
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr
    assert f"  or: simplegpt serve {args[1]} {args[2]} " in proc.stdout  # the same checkpoint
    again = _cli("train", "--resume", str(tmp_path / "run"), "--quiet", cwd=tmp_path)
    assert again.returncode == 0 and "had already finished its 3 steps" in again.stderr, again.stderr
    assert "--max_iters 6" in again.stderr


def test_resume_is_bit_identical_with_a_measured_peak_flops(tmp_path, corpus):
    # measuring the CPU's matmul rate at the start must not draw from the random stream dropout uses
    kw = dict(dropout=0.1, max_iters=6, peak_flops=0.0, sample_tokens=0)
    full = train(tiny(tmp_path, corpus, out_dir=str(tmp_path / "full"), **kw), progress=False)
    cfg = tiny(tmp_path, corpus, out_dir=str(tmp_path / "part"), **kw)
    first = train(cfg, stop_at=3, progress=False)
    resumed = train(cfg, resume=tmp_path / "part", progress=False)
    assert first.losses + resumed.losses == full.losses


def test_training_steps_evaluations_and_samples_skip_the_forwards_input_check(tmp_path, corpus, monkeypatch):
    """The trainer's batches are checked where they enter (the dataset's tokenizer, block_size), so no
    forward of a step, an evaluation or a sample reads its input's values on the host (GPT.check_input)."""
    def refuse(self, *args):
        raise AssertionError("a training forward checked its input on the host")

    monkeypatch.setattr(GPT, "check_input", refuse)
    monkeypatch.setattr(GPT, "check_ids", refuse)
    result = train(tiny(tmp_path, corpus, max_iters=4, eval_interval=2, sample_prompt="ROMEO:\n"), progress=False)
    assert result.step == 4 and math.isfinite(result.val_loss)
