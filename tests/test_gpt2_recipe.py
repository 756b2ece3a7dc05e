"""configs/gpt2_124m.toml, the recipe for GPT-2 124M on a large corpus: it loads and validates as
`simplegpt train --config` reads it, and its numbers are the ones its comment promises."""

import re
import subprocess
import sys
from pathlib import Path

from simplegpt.config import load_config, read_toml, resolve_config_path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "gpt2_124m.toml"


def test_the_recipe_is_the_built_in_one_and_loads():
    assert resolve_config_path("gpt2_124m").resolve() == RECIPE.resolve()  # one file, shipped in the package
    by_name, by_path = load_config("gpt2_124m"), load_config(str(RECIPE))
    assert by_name.to_dict() == by_path.to_dict()
    assert set(read_toml(RECIPE)) <= set(by_name.to_dict())  # every key of the file is a known key


def test_its_global_batch_and_length_are_what_its_comment_says():
    text = RECIPE.read_text()
    cfg = load_config(str(RECIPE))
    said = re.search(r"([\d,]+) tokens per optimizer step \(batch_size (\d+) x grad_accum_steps (\d+) x "
                     r"block_size (\d+)\) for ([\d,]+) steps,\s*#?\s*(\d+)B tokens", text)
    assert said, "the comment no longer states the global batch"
    tokens, batch, accum, block, steps, billions = (int(g.replace(",", "")) for g in said.groups())
    assert (cfg.batch_size, cfg.grad_accum_steps, cfg.block_size, cfg.max_iters) == (batch, accum, block, steps)
    assert cfg.batch_size * cfg.grad_accum_steps * cfg.block_size == tokens == 2**19  # ~0.5M, GPT-3 small's
    assert abs(cfg.max_iters * tokens - billions * 1e9) < 1e-3 * billions * 1e9
    assert all(accum % n == 0 for n in (1, 2, 4, 8))  # the same steps on 1, 2, 4 or 8 GPUs


def test_its_optimizer_and_precision_are_the_gpt2_recipe():
    cfg = load_config(str(RECIPE))
    assert (cfg.lr, cfg.min_lr, cfg.schedule, cfg.warmup_iters) == (6e-4, 6e-5, "cosine", 700)
    assert (cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.grad_clip, cfg.fused) == (0.1, 0.9, 0.95, 1.0, True)
    assert (cfg.dtype, cfg.compile, cfg.dropout, cfg.bias) == ("auto", True, 0.0, True)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.tokenizer) == (12, 12, 768, "gpt2")


def test_simplegpt_train_accepts_it(tmp_path):
    """A real `simplegpt train --config configs/gpt2_124m.toml` process, shrunk from the command line to
    one step of a tiny model on a small text (the file's own keys all pass the command's checks)."""
    corpus = tmp_path / "notes.txt"
    corpus.write_text("a recipe is a promise that the numbers add up.\n" * 200)  # its val_fraction 0.005 must hold a block
    shrink = {"data": corpus, "tokenizer": "char", "n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 16,
              "batch_size": 2, "grad_accum_steps": 2, "max_iters": 1, "eval_iters": 1, "compile": "false",
              "device": "cpu", "num_threads": 1, "plot": "false", "tensorboard": "false", "sample_tokens": 0}
    args = [a for k, v in shrink.items() for a in (f"--{k}", str(v))]
    proc = subprocess.run([sys.executable, "-m", "simplegpt", "train", "--config", str(RECIPE), *args, "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "notes_char" / "last").is_dir()  # the file's out_dir follows the new data
