"""Muon's options and the optimizer's hyperparameters on the command line are used or refused, never
left unused without a word: on a run that trains with AdamW, and on a resumed run (whose optimizer
state brings its own momentum, betas, weight decay and AdamW lr ratio back)."""

from pathlib import Path

import pytest

from simplegpt.cli import main
from simplegpt.config import load_config
from simplegpt.errors import ConfigError
from simplegpt.training.start import check_resume_compatible


@pytest.mark.parametrize("option", ["--muon_momentum", "--adamw_lr_ratio"])
def test_muon_options_on_a_run_that_trains_with_adamw_are_refused_in_one_line(option, tmp_path, capsys):
    code = main(["train", "--config", "speedrun_cpu_short", "--optimizer", "adamw", option, "0.5",
                 "--out_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "Traceback" not in err
    assert f"{option} applies to optimizer = 'muon' only" in err and "'adamw'" in err
    assert not (tmp_path / "run").exists()


def test_muon_options_at_their_defaults_on_an_adamw_run_are_not_refused(tmp_path, monkeypatch):
    """A whole config written out as options (defaults included, as tests/test_lora.py's DDP run passes
    it) trains: only a Muon option set to another value than its default goes unused."""
    monkeypatch.chdir(tmp_path)  # the recipe's data folder is relative
    code = main(["train", "--config", "speedrun_cpu_short", "--optimizer", "adamw", "--muon_momentum", "0.95",
                 "--adamw_lr_ratio", "1.0", "--max_iters", "2", "--time", "0", "--eval_interval", "2",
                 "--eval_iters", "1", "--sample_tokens", "0", "--quiet", "--out_dir", str(tmp_path / "run")])
    assert code == 0 and (tmp_path / "run" / "last").is_dir()


@pytest.mark.parametrize("key, value", [("muon_momentum", 0.5), ("adamw_lr_ratio", 3.0), ("beta2", 0.95),
                                        ("weight_decay", 0.0)])
def test_a_resumed_run_refuses_a_hyperparameter_its_optimizer_state_would_override(key, value):
    saved = load_config("speedrun_cpu_short").to_dict()
    with pytest.raises(ConfigError, match=f"cannot resume .* with {key}={value!r}: the checkpoint has {key}="):
        check_resume_compatible(saved, load_config("speedrun_cpu_short", {key: value}), Path("out/run/last"))
    check_resume_compatible(saved, load_config("speedrun_cpu_short", {"max_iters": 10, "lr": 1e-2}),
                            Path("out/run/last"))  # the schedule's keys stay free
