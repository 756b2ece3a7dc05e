"""TrainConfig: the model's shape held as one GPTConfig, checked once, and configs and runs written
before that still load and resume."""

import json
import subprocess
import sys

import pytest

from simplegpt.checkpoint import load_checkpoint
from simplegpt.config import TrainConfig, load_config, read_toml, to_toml
from simplegpt.errors import ConfigError
from simplegpt.model import GPTConfig
from simplegpt.trainer import train

# A config.toml as runs saved it before [model] became the shape: init_from under [model].
OLD_CONFIG_TOML = """[data]
data = "{data}"
data_dir = "{data_dir}"
tokenizer = "char"
val_fraction = 0.1
text_field = "text"
batch_mode = "packed"

[model]
n_layer = 1
n_head = 2
n_embd = 16
block_size = 16
dropout = 0.0
bias = true
init_from = ""

[optim]
batch_size = 4
grad_accum_steps = 1
max_iters = 6
lr = 0.001
min_lr = 0.0001
schedule = "cosine"
warmup_iters = 2
decay_fraction = 0.2
weight_decay = 0.1
decay_embeddings = false
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
fused = true

[eval]
eval_interval = 3
eval_iters = 2
log_interval = 1
sample_tokens = 0
sample_prompt = ""

[run]
out_dir = "{out_dir}"
seed = 1337
device = "auto"
dtype = "auto"
compile = false
num_threads = 1
cpu_shards = 0
tensorboard = false
plot = false
peak_flops = 1000000000000.0
"""


def test_the_shape_is_one_gpt_config():
    cfg = TrainConfig(n_layer=3, n_head=2, n_embd=24, block_size=48, dropout=0.1, bias=False)
    assert cfg.model == GPTConfig(n_layer=3, n_head=2, n_embd=24, n_positions=48, dropout=0.1, bias=False)
    assert (cfg.n_layer, cfg.block_size, cfg.dropout, cfg.bias) == (3, 48, 0.1, False)
    shape = GPTConfig(vocab_size=65, n_layer=2, n_head=4, n_embd=32, n_positions=8)
    given = TrainConfig(model=shape, lr=3e-4)
    assert given.model == shape and given.block_size == 8 and given.to_dict()["block_size"] == 8
    assert given.replace(n_layer=5).model == GPTConfig(vocab_size=65, n_layer=5, n_head=4, n_embd=32, n_positions=8)
    assert given.replace(lr=1e-3).model == shape  # other keys leave the whole shape (vocab_size too) as it was
    assert "n_positions" not in given.to_dict() and "vocab_size" not in given.to_dict()


def test_a_bad_shape_is_refused_once_in_the_config_key_names():
    with pytest.raises(ValueError) as by_model:
        GPTConfig(n_embd=10, n_head=4)
    with pytest.raises(ConfigError) as by_config:
        TrainConfig(n_embd=10, n_head=4)
    # GPTConfig's one check, said with the keys the user typed
    assert str(by_config.value) == str(by_model.value).replace("GPTConfig.", "")
    assert str(by_config.value).startswith("n_embd (10) must be divisible by n_head (4)")
    with pytest.raises(ConfigError, match=r"^block_size must be a positive integer, got 0$"):
        TrainConfig(block_size=0)
    with pytest.raises(ConfigError, match=r"^n_layer must be an integer, got 2.5"):
        TrainConfig(n_layer=2.5)
    with pytest.raises(ConfigError, match=r"^dropout must be in \[0, 1\), got 1.0"):
        TrainConfig(dropout=1.0)


def test_cli_bad_shape_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "simplegpt", "train", "--n_embd", "10", "--n_head", "4",
                           "--out_dir", str(tmp_path / "run"), "--quiet"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "n_embd (10) must be divisible by n_head (4)" in line and "GPTConfig" not in line
    assert not (tmp_path / "run").exists()


def test_saved_config_is_the_new_layout_and_round_trips(tmp_path):
    cfg = load_config(None, {"n_layer": 6, "block_size": 32, "init_from": "out/x/last"})
    text = to_toml(cfg)
    model_table = [ln.split(" = ")[0] for ln in text.split("[model]\n")[1].split("\n\n")[0].splitlines()]
    assert model_table == ["n_layer", "n_head", "n_embd", "block_size", "dropout", "bias",  # the shape alone
                           "n_kv_head", "head_dim", "positions", "rope_theta", "norm", "norm_gain", "rms_norm_eps",
                           "mlp", "intermediate_size", "qk_norm", "tie_word_embeddings"]  # its Llama-style options
    assert 'init_from = "out/x/last"' in text.split("[run]\n")[1]
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert load_config(str(path)) == cfg and read_toml(path) == cfg.to_dict()


def test_an_old_layout_config_and_saved_run_still_load_and_resume(tmp_path, shakespeare_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_path.read_text()[:30_000])
    old = tmp_path / "old.toml"
    old.write_text(OLD_CONFIG_TOML.format(data=corpus, data_dir=tmp_path / "data", out_dir=tmp_path / "run"))
    cfg = load_config(str(old))
    assert cfg.model == GPTConfig(n_layer=1, n_head=2, n_embd=16, n_positions=16) and cfg.init_from == ""
    first = train(cfg, stop_at=3, progress=False, log=lambda s: None)
    assert first.step == 3
    run = tmp_path / "run"
    # the run as an earlier trainer left it: its config.toml in the old layout, and a train_config with
    # a key this version no longer has
    (run / "config.toml").write_text(old.read_text())
    doc = json.loads((run / "last" / "config.json").read_text())
    doc["train_config"]["retired_key"] = 1
    (run / "last" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="stopped at step 3/6"):  # recognised as this run, not another one
        train(cfg, progress=False, log=lambda s: None)
    proc = subprocess.run([sys.executable, "-m", "simplegpt", "train", "--resume", str(run), "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ck = load_checkpoint(run / "last")
    assert ck.metadata["step"] == 6 and ck.config.n_positions == 16
    assert read_toml(run / "config.toml") == cfg.to_dict()  # rewritten in the new layout
