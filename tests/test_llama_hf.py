"""Llama-style models and Hugging Face: LlamaForCausalLM and Qwen3ForCausalLM both ways (logits, greedy
generation of left-padded batches, tokenizer.json ids), and the one-line refusals."""

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face parity tests need the 'hf' extra")
from safetensors.torch import load_file  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          Qwen3Config, Qwen3ForCausalLM)

from simplegpt.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from simplegpt.cli import main  # noqa: E402
from simplegpt.engine import Engine, SamplingParams  # noqa: E402
from simplegpt.hf import export_hf, import_hf  # noqa: E402
from simplegpt.hf_tokenizer import HFTokenizer  # noqa: E402
from simplegpt.model import GPT, GPTConfig  # noqa: E402

V = 300
SHAPE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0)
MODELS = {
    "llama-gqa-tied": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=True)),
    "llama-gqa-untied": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=False)),
    "llama-bias": (LlamaForCausalLM, LlamaConfig, dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4)),
    "qwen3-qknorm": (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=16, tie_word_embeddings=False)),
}
TEXT = "Hello, world! Grüße aus Köln — naïve café. 日本語のテキスト、中文文本。Привет, мир! 🤖🚀👩‍👩‍👧 ¿Qué tal?\n\ttabs"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny models: two threads of a busy 2-core machine wait for each other


def make_hf(name: str, seed: int = 0):
    cls, config_cls, extra = MODELS[name]
    torch.manual_seed(seed)
    model = cls(config_cls(**{**SHAPE, **extra}, bos_token_id=0, eos_token_id=1, pad_token_id=2)).eval()
    with torch.no_grad():  # random values everywhere: no mapping error hides behind unit gains or zero biases
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def save_hf(model, path: Path, max_shard_size: str | None = None) -> Path:
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return path


def logits_of(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_import_and_export_give_transformers_logits(name, tmp_path):
    hf = make_hf(name)
    # sharded safetensors (model.safetensors.index.json) for one model, one file for the others
    src = save_hf(hf, tmp_path / "hf", "40KB" if name == "llama-gqa-untied" else None)
    if name == "llama-gqa-untied":
        assert (src / "model.safetensors.index.json").is_file()
    ck = import_hf(str(src), tmp_path / "ck")
    idx = torch.randint(0, V, (2, 24))
    expected = logits_of(hf, idx)
    assert (logits_of(ck.model, idx) - expected).abs().max() < 1e-5
    assert ck.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert ck.config.qk_norm == name.startswith("qwen3")
    # and back: a simplegpt model of random weights, exported, loads in transformers with its logits
    ours = GPT(ck.config)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    save_checkpoint(tmp_path / "mine", ours)
    export_hf(tmp_path / "mine", tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    assert (logits_of(back, idx) - logits_of(ours, idx)).abs().max() < 1e-5


def test_round_trip_is_bit_identical(tmp_path):
    src = save_hf(make_hf("qwen3-qknorm"), tmp_path / "hf")
    import_hf(str(src), tmp_path / "ck")
    export_hf(tmp_path / "ck", tmp_path / "out")
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen3-qknorm"])
def test_greedy_generation_of_a_left_padded_batch_equals_transformers_generate(name, tmp_path):
    hf = make_hf(name, seed=3)
    ck = import_hf(str(save_hf(hf, tmp_path / "hf")), tmp_path / "ck")
    prompts = [[5, 17, 42, 99, 7, 250, 31, 8, 64, 12, 3], [200, 4], [77, 78, 79, 80, 81, 13]]
    width = max(map(len, prompts))
    pad = hf.config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          pad_token_id=pad, eos_token_id=None)
    expected = out[:, width:].tolist()
    params = SamplingParams(max_new_tokens=32, temperature=0.0, stop_at_eos=False)
    assert [r.token_ids for r in Engine(ck.model, eos_id=1).generate(prompts, params)] == expected


def bpe_tokenizer_json() -> str:
    """A byte-level BPE trained on multilingual text, with Llama-3-style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V - 3, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT * 3, "the quick brown fox jumps over the lazy dog " * 20, "Grüße Köln 日本語"],
                            trainer=trainer)
    return tok.to_str()


def sentencepiece_tokenizer_json() -> str:
    """A Llama-2-style tokenizer: '▁' for spaces, a BPE with byte fallback (<0xNN> tokens for what it
    has no merge for, emoji included), and a decoder that strips the space the encoding put first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=specials, show_progress=False, limit_alphabet=30)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, "Grüße Köln naïve café"],
                            trainer=trainer)
    return tok.to_str()


TOKENIZERS = {
    "byte-level": (bpe_tokenizer_json, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                        "pad_token": "<pad>"}),
    "sentencepiece": (sentencepiece_tokenizer_json, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
}


@pytest.fixture(params=list(TOKENIZERS))
def llama_with_tokenizer(request, tmp_path) -> Path:
    make, special = TOKENIZERS[request.param]
    src = save_hf(make_hf("llama-gqa-tied"), tmp_path / "hf-tok")
    (src / "tokenizer.json").write_text(make(), encoding="utf-8")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **special}))
    return src


def test_imported_tokenizer_json_gives_transformers_ids_and_travels_with_the_model(llama_with_tokenizer, tmp_path,
                                                                                    capsys):
    src = llama_with_tokenizer
    reference = AutoTokenizer.from_pretrained(src)
    assert main(["import-hf", str(src), str(tmp_path / "ck")]) == 0
    ck = load_checkpoint(tmp_path / "ck")
    assert isinstance(ck.tokenizer, HFTokenizer) and ck.tokenizer.eos_id == reference.eos_token_id
    want = reference(TEXT, add_special_tokens=False)["input_ids"]
    assert ck.tokenizer.encode(TEXT) == want
    assert ck.tokenizer.decode(want) == reference.decode(want) == TEXT
    # the command line uses the checkpoint's tokenizer; export writes it for AutoTokenizer
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "ck"), "--prompt", "Grüße 🤖", "--max-new-tokens", "5",
                 "--temperature", "0", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("Grüße 🤖")
    export_hf(tmp_path / "ck", tmp_path / "out")
    assert AutoTokenizer.from_pretrained(tmp_path / "out")(TEXT, add_special_tokens=False)["input_ids"] == want


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # what came before (transformers' progress bars)
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, *words: str) -> None:
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("options, words", [
    (dict(positions="rotary", norm="rmsnorm", mlp="relu2"), ["mlp='relu2'", "no Hugging Face class"]),
    (dict(norm="rmsnorm"), ["learned positions are GPT-2's", "GPT2LMHeadModel has no norm='rmsnorm'"]),
    (dict(tie_word_embeddings=False, n_kv_head=1), ["GPT2LMHeadModel has no n_kv_head=1, tie_word_embeddings=false"]),
    (dict(positions="rotary", norm="rmsnorm", mlp="swiglu", norm_gain=False), ["norm_gain=false"]),
    (dict(positions="rotary", mlp="swiglu"), ["norm='layernorm'"]),
])
def test_export_of_an_option_without_a_hf_class_is_one_line(options, words, tmp_path, capsys):
    save_checkpoint(tmp_path / "ck", GPT(GPTConfig(vocab_size=V, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                                   **options)))
    code, _, err = cli(capsys, "export-hf", str(tmp_path / "ck"), str(tmp_path / "out"))
    assert_one_line(code, err, *words)
    assert not (tmp_path / "out").exists()


def test_import_of_an_unknown_architecture_names_it_and_the_known_ones(tmp_path, capsys):
    src = save_hf(make_hf("llama-gqa-tied"), tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli(capsys, "import-hf", str(src), str(tmp_path / "out"))
    assert_one_line(code, err, "'mistral'", "MistralForCausalLM", "GPT2LMHeadModel", "LlamaForCausalLM",
                    "Qwen3ForCausalLM")


@pytest.mark.parametrize("change, words", [
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), ["rope scaling 'llama3'"]),
    (dict(hidden_act="gelu"), ["hidden_act='gelu'"]),
    (dict(attention_bias=True, mlp_bias=False), ["attention_bias=True with mlp_bias=False"]),
])
def test_import_of_a_variant_simplegpt_cannot_run_is_one_line(change, words, tmp_path, capsys):
    src = save_hf(make_hf("llama-gqa-tied"), tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(change)
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli(capsys, "import-hf", str(src), str(tmp_path / "out"))
    assert_one_line(code, err, "LlamaForCausalLM variant", *words)


@pytest.mark.parametrize("change, words", [
    (dict(num_hidden_layers=10**9), ["num_hidden_layers=1000000000", "2 layers"]),
    (dict(intermediate_size=40), ["mlp.gate_proj.weight", "shape"]),
    (dict(num_key_value_heads=4), ["k_proj", "shape"]),
])
def test_a_config_json_that_does_not_match_its_weights_is_one_line(change, words, tmp_path, capsys):
    src = save_hf(make_hf("llama-gqa-tied"), tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(change)
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli(capsys, "import-hf", str(src), str(tmp_path / "out"))
    assert_one_line(code, err, *words)


def test_fine_tuning_a_hf_folder_with_another_shape_option_is_one_line(tmp_path, capsys):
    # the shape is read from config.json before the weights: the option would otherwise go unused
    hf = save_hf(make_hf("qwen3-qknorm"), tmp_path / "hf")
    code, _, err = cli(capsys, "train", "--init-from", str(hf), "--qk_norm", "false",
                       "--out_dir", str(tmp_path / "run"), "--quiet")
    assert_one_line(code, err, f"cannot fine-tune {hf} with qk_norm=False: the model has qk_norm=True")
    assert not (tmp_path / "run").exists()
