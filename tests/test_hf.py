"""Hugging Face interop: import/export GPT-2 weights exactly, tokenizer files, greedy parity, bad input."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face parity tests need the 'hf' extra")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402

from simplegpt import GPT, GPTConfig  # noqa: E402
from simplegpt.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from simplegpt.cli import main  # noqa: E402
from simplegpt.engine import generate_ids  # noqa: E402
from simplegpt.hf import export_hf, import_hf, rule_for  # noqa: E402
from simplegpt.tokenizer import ByteTokenizer, CharTokenizer, GPT2Tokenizer  # noqa: E402

V_GPT2 = 50257
TINY = dict(n_positions=48, n_embd=32, n_layer=2, n_head=4)


def randomize_(model: torch.nn.Module) -> None:
    """Random values in every tensor, biases and LayerNorms included, so no mapping error hides
    behind GPT-2's zero-bias / unit-gain init."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=V_GPT2, bos_token_id=50256, eos_token_id=50256, **TINY)
    model = GPT2LMHeadModel(cfg)
    randomize_(model)
    path = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    model.save_pretrained(path)
    return path


def hf_logits(path: Path, idx: torch.Tensor) -> torch.Tensor:
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        return model(idx).logits


def capture_transformers_warnings():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    return records, handler


def test_key_rules_transpose_exactly_the_conv1d_weights():
    model = GPT(GPTConfig(vocab_size=11, **TINY))
    transposed = {name for name, _ in model.named_parameters() if rule_for(name).transpose}
    assert transposed == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def test_import_gives_hf_logits(hf_dir, tmp_path):
    ck = import_hf(str(hf_dir), tmp_path / "ck")
    idx = torch.randint(0, V_GPT2, (3, TINY["n_positions"]))
    loaded = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        ours, _ = loaded.model(idx)
    assert (ours - hf_logits(hf_dir, idx)).abs().max().item() < 1e-5
    assert isinstance(loaded.tokenizer, GPT2Tokenizer)
    assert loaded.config.n_positions == TINY["n_positions"] and loaded.config.vocab_size == V_GPT2
    assert ck.metadata["imported_from"] == str(hf_dir)


def test_export_loads_in_transformers_without_warnings(tmp_path):
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=V_GPT2, **TINY))
    randomize_(model)
    save_checkpoint(tmp_path / "ck", model, GPT2Tokenizer())
    export_hf(tmp_path / "ck", tmp_path / "hf")
    records, handler = capture_transformers_warnings()
    try:
        hf, info = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
        tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not any(info.values()), info
    assert not records, [r.getMessage()[:200] for r in records]
    idx = torch.randint(0, V_GPT2, (2, TINY["n_positions"]))
    with torch.no_grad():
        ours, _ = model.eval()(idx)
        theirs = hf.eval()(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    assert tok("Hello, how are you?")["input_ids"] == [15496, 11, 703, 389, 345, 30]
    text = "Round trip: naïve café, 日本語,  two  spaces\n\tand a tab."
    assert tok(text)["input_ids"] == GPT2Tokenizer().encode(text)
    assert tok.eos_token_id == 50256 and tok.model_max_length == TINY["n_positions"]


SPACED = ["y is ?", "a , b . c ! d", "it 's , we 're , do n't , I 'm , you 've", "x  ?  y"]


def test_exported_tokenizer_decodes_the_text_it_encoded(tmp_path):
    """tokenizer_config.json did not set clean_up_tokenization_spaces, which transformers 4.40 to 4.44
    (pyproject allows >= 4.40) default to True: "y is ?" decoded as "y is?". It is written False, and
    every spacing comes back as it was, from the fast and the slow tokenizer."""
    save_checkpoint(tmp_path / "ck", GPT(GPTConfig(vocab_size=V_GPT2, **TINY)), GPT2Tokenizer())
    export_hf(tmp_path / "ck", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["clean_up_tokenization_spaces"] is False
    for use_fast in (True, False):
        tok = AutoTokenizer.from_pretrained(tmp_path / "hf", use_fast=use_fast)
        for text in SPACED:
            ids = tok(text)["input_ids"]
            assert ids == GPT2Tokenizer().encode(text)
            assert tok.decode(ids) == text and tok.batch_decode([ids]) == [text], (use_fast, text)


def test_round_trip_is_bit_identical(hf_dir, tmp_path):
    import_hf(str(hf_dir), tmp_path / "ck")
    export_hf(tmp_path / "ck", tmp_path / "back")
    before, after = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    # and the other way: simplegpt -> HF -> simplegpt
    import_hf(str(tmp_path / "back"), tmp_path / "ck2")
    a = load_file(tmp_path / "ck" / "model.safetensors")
    b = load_file(tmp_path / "ck2" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_greedy_generation_matches_hf_generate(hf_dir, tmp_path):
    ck = import_hf(str(hf_dir), tmp_path / "ck")
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    for prompt in ([464, 2068, 7586, 21831], [15496, 11, 703, 389, 345, 30, 198, 40]):
        n = TINY["n_positions"] - len(prompt)
        ours = generate_ids(ck.model, prompt, n)
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=50256, min_new_tokens=n)
        assert ours == out[0, len(prompt):].tolist()
        assert len(set(ours)) > 1  # a constant output would hide ordering mistakes


@pytest.mark.parametrize("tokenizer", [CharTokenizer.from_text("hello world, HF!"), ByteTokenizer()],
                         ids=["char", "byte"])
def test_non_gpt2_tokenizer_exports_weights_and_reimports(tokenizer, tmp_path):
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, bias=False, **TINY))
    randomize_(model)
    save_checkpoint(tmp_path / "ck", model, tokenizer)
    result = export_hf(tmp_path / "ck", tmp_path / "hf")
    assert not result.tokenizer_exported and result.tokenizer == tokenizer.kind
    assert not (tmp_path / "hf" / "vocab.json").exists()
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["vocab_size"] == tokenizer.vocab_size and cfg["eos_token_id"] == tokenizer.eos_id
    records, handler = capture_transformers_warnings()
    try:
        hf, info = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not any(info.values()) and not records
    idx = torch.randint(0, tokenizer.vocab_size, (2, 16))
    with torch.no_grad():
        # bias=False exports as zero biases, which compute the same thing
        assert (model.eval()(idx)[0] - hf.eval()(idx).logits).abs().max().item() < 1e-5
    back = import_hf(str(tmp_path / "hf"), tmp_path / "ck2")
    assert back.tokenizer.spec() == tokenizer.spec()
    assert back.tokenizer.encode("hello") == tokenizer.encode("hello")


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]


def test_cli_import_and_export(hf_dir, tmp_path, capsys):
    code, out, _ = cli(capsys, "import-hf", str(hf_dir), str(tmp_path / "ck"))
    assert code == 0 and "tokenizer gpt2" in out
    code, out, err = cli(capsys, "export-hf", str(tmp_path / "ck"), str(tmp_path / "hf"))
    assert code == 0 and "vocab.json" in out and not err
    # an existing non-empty output is never replaced without --overwrite
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, "import-hf", str(hf_dir), str(tmp_path / "keep"))
    assert_one_line_error(code, err, "--overwrite")
    code, _, err = cli(capsys, "export-hf", str(tmp_path / "ck"), str(tmp_path / "keep"))
    assert_one_line_error(code, err, "--overwrite")
    assert (tmp_path / "keep" / "notes.txt").read_text() == "mine"


def test_cli_export_warns_which_tokenizer_files_are_missing(tmp_path, capsys):
    save_checkpoint(tmp_path / "ck", GPT(GPTConfig(vocab_size=257, **TINY)), ByteTokenizer())
    code, _, err = cli(capsys, "export-hf", str(tmp_path / "ck"), str(tmp_path / "hf"))
    assert code == 0 and "byte tokenizer" in err and "AutoTokenizer" in err and "simplegpt_tokenizer" in err


def make_bad(kind: str, hf_dir: Path, root: Path) -> Path:
    bad = root / kind
    bad.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(hf_dir / "model.safetensors")
    if kind == "unknown-architecture":
        cfg = {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 32}
    elif kind == "shape":
        cfg["n_embd"] = 64
        cfg["n_head"] = 4
    elif kind == "missing-key":
        weights.pop("transformer.h.1.mlp.c_fc.weight")
    elif kind == "truncated":
        data = (hf_dir / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "variant":
        cfg["activation_function"] = "relu"
    elif kind == "untied":
        cfg["tie_word_embeddings"] = False
        weights["lm_head.weight"] = torch.randn_like(weights["transformer.wte.weight"])
    if kind != "no-config":
        (bad / "config.json").write_text(json.dumps(cfg))
    if kind not in ("no-weights", "truncated"):
        save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


@pytest.mark.parametrize("kind, words", [
    ("no-config", ["config.json is missing"]),
    ("no-weights", ["no weights", "model.safetensors"]),
    ("unknown-architecture", ["'mistral'", "MistralForCausalLM", "it imports GPT2LMHeadModel", "LlamaForCausalLM"]),
    ("shape", ["shape", "config and weights do not match"]),
    ("missing-key", ["missing weight", "h.1.mlp.c_fc.weight"]),
    ("truncated", ["truncated or corrupted"]),
    ("variant", ["activation_function", "cannot run exactly"]),
    ("untied", ["lm_head.weight", "tie"]),
])
def test_cli_bad_hf_directories(kind, words, hf_dir, tmp_path, capsys):
    bad = make_bad(kind, hf_dir, tmp_path)
    code, _, err = cli(capsys, "import-hf", str(bad), str(tmp_path / "out"))
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "out").exists()


def test_cli_bad_paths(tmp_path, capsys):
    code, _, err = cli(capsys, "import-hf", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert_one_line_error(code, err, "not a directory")
    code, _, err = cli(capsys, "export-hf", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert_one_line_error(code, err, "does not exist")


def test_hub_name_without_transformers_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    code, _, err = cli(capsys, "import-hf", "gpt2", str(tmp_path / "out"))
    assert_one_line_error(code, err, "transformers", 'pip install "simplegpt-toolkit[hf]"')


@pytest.mark.parametrize("env_update", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "https://hub.invalid"}])
def test_offline_hub_name_is_one_clear_line(tmp_path, env_update):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), **env_update}
    proc = subprocess.run([sys.executable, "-m", "simplegpt", "import-hf", "gpt2", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and ("offline" in lines[0] or "cannot be reached" in lines[0]), proc.stderr
    assert "local" in lines[0], proc.stderr


def test_fine_tune_from_hf_directory(hf_dir, tmp_path, capsys, shakespeare_path):
    from simplegpt.evaluation.perplexity import evaluate_text
    from simplegpt.hf import load_hf_model

    text = shakespeare_path.read_text(encoding="utf-8")[:3000]
    (tmp_path / "ft.txt").write_text(text, encoding="utf-8")
    before = load_hf_model(str(hf_dir))
    code = main(["train", "--init-from", str(hf_dir), "--data", str(tmp_path / "ft.txt"), "--tokenizer", "gpt2",
                 "--data_dir", str(tmp_path / "data"), "--block_size", "16", "--max_iters", "12",
                 "--batch_size", "4", "--eval_interval", "12", "--eval_iters", "1", "--sample_tokens", "0",
                 "--warmup_iters", "0", "--lr", "1e-2", "--out_dir", str(tmp_path / "run"), "--quiet",
                 "--plot", "false", "--tensorboard", "false"])
    capsys.readouterr()
    assert code == 0
    after = load_checkpoint(tmp_path / "run" / "last")
    assert isinstance(after.tokenizer, GPT2Tokenizer) and after.config.n_positions == 16
    # it started from the imported weights: 12 small Adam steps stay near them (a fresh init has LN gains of 1)
    moved = (after.model.transformer.ln_f.weight - before.model.transformer.ln_f.weight).abs().max().item()
    assert moved < 0.3, moved
    loss = [evaluate_text(m, GPT2Tokenizer(), text, context=16, stride=16).loss for m in (before.model, after.model)]
    assert loss[1] < loss[0] - 0.2, loss  # it trained from the imported weights, with the GPT-2 tokenizer
    # and the fine-tuned model goes back to Hugging Face
    export_hf(tmp_path / "run" / "last", tmp_path / "hf")
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "hf").config.n_positions == 16


def test_imported_model_is_tied_and_trainable(hf_dir):
    from simplegpt.hf import load_hf_model

    model = load_hf_model(str(hf_dir)).model
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == model.num_parameters()
    idx = torch.randint(0, V_GPT2, (2, 8))
    _, loss = model.train()(idx, targets=idx)
    loss.backward()
    assert model.transformer.wte.weight.grad is not None


def test_import_original_style_pytorch_bin(hf_dir, tmp_path):
    """The original GPT-2 uploads: pytorch_model.bin from GPT2Model (no `transformer.` prefix, no
    lm_head) holding the causal-mask buffers attn.bias / attn.masked_bias."""
    state = {k.removeprefix("transformer."): v for k, v in load_file(hf_dir / "model.safetensors").items()}
    n = TINY["n_positions"]
    for i in range(TINY["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    old = tmp_path / "old"
    old.mkdir()
    torch.save(state, old / "pytorch_model.bin")
    (old / "config.json").write_text((hf_dir / "config.json").read_text())
    ck = import_hf(str(old), tmp_path / "ck")
    idx = torch.randint(0, V_GPT2, (2, n))
    with torch.no_grad():
        assert (ck.model(idx)[0] - hf_logits(hf_dir, idx)).abs().max().item() < 1e-5


def test_other_vocabulary_imports_without_tokenizer(tmp_path, capsys):
    GPT2LMHeadModel(GPT2Config(vocab_size=100, bos_token_id=0, eos_token_id=0, **TINY)).save_pretrained(tmp_path / "v")
    code, out, err = cli(capsys, "import-hf", str(tmp_path / "v"), str(tmp_path / "ck"))
    assert code == 0 and "tokenizer none" in out and "not GPT-2's" in err
    assert load_checkpoint(tmp_path / "ck").tokenizer is None
