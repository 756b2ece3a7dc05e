"""import-gguf, the way back: export-gguf then import-gguf gives the same model, tokenizer and chat template."""

import pytest
import torch

from conftest import make_tiny_gpt, with_template
from simplegpt.checkpoint import load_checkpoint, save_checkpoint
from simplegpt.cli import main
from simplegpt.gguf_export import export_gguf
from simplegpt.gguf_import import import_gguf
from simplegpt.hf_tokenizer import train_bpe
from simplegpt.tokenizer import ByteTokenizer, CharTokenizer, GPT2Tokenizer

gguf = pytest.importorskip("gguf")

TEXTS = ["Hello, how are you?", "  two  spaces\n\ttab", "emoji 🙂 and 日本語", "<|endoftext|> as text",
         "x = [1, 2]"]


def _exported(tmp_path, tokenizer, qtype="f32", metadata=None, **overrides):
    model = make_tiny_gpt(vocab_size=tokenizer.vocab_size, jitter=0.05, scale=4.0, **overrides)
    ck = save_checkpoint(tmp_path / "ck", model, tokenizer, metadata=metadata)
    return ck, export_gguf(ck, tmp_path / "m.gguf", type=qtype).path


@pytest.mark.parametrize("name", ["gpt2", "bpe", "byte", "char", "char-wide"])
def test_a_round_trip_keeps_every_weight_and_the_tokenizer(tmp_path, name):
    tokenizer = {"gpt2": GPT2Tokenizer, "byte": ByteTokenizer,
                 "bpe": lambda: train_bpe([" ".join(TEXTS) * 30], 300),
                 "char": lambda: CharTokenizer(" !,.?Hadehlorwuyx=[]12\n\t"),
                 # emoji and CJK: written with a merge chain per character, read back as characters
                 "char-wide": lambda: CharTokenizer("".join(TEXTS))}[name]()
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    if name == "bpe":  # the trained BPE carries a chat template; the others come back as their own kind
        tokenizer = with_template(tokenizer, template)
    ck, file = _exported(tmp_path, tokenizer, bias=name != "byte")
    back = import_gguf(file, tmp_path / "back")
    ours = load_checkpoint(ck)
    # GGUF stores the epsilon as a float32: the config gets back the decimal it was, not 9.99999974e-06
    assert back.model.config.layer_norm_epsilon == ours.model.config.layer_norm_epsilon == 1e-5
    assert getattr(back.tokenizer, "chat_template", None) == (template if name == "bpe" else None)
    state, got = ours.model.state_dict(), back.model.state_dict()
    for key, value in got.items():  # a model without biases comes back with zero ones
        assert torch.equal(value, state[key] if key in state else torch.zeros_like(value)), key
    assert back.tokenizer.vocab_size == tokenizer.vocab_size and back.tokenizer.eos_id == tokenizer.eos_id
    for text in TEXTS:
        kept, _ = tokenizer.known_text(text)
        assert back.tokenizer.encode(kept) == tokenizer.encode(kept), text
    expected_kind = {"bpe": "hf", "char-wide": "char"}.get(name, name)
    assert load_checkpoint(tmp_path / "back").tokenizer.kind == expected_kind


def test_q8_0_comes_back_dequantized_with_its_rounding(tmp_path):
    ck, file = _exported(tmp_path, ByteTokenizer(), qtype="q8_0")
    back = import_gguf(file, tmp_path / "back").model.state_dict()
    for key, value in load_checkpoint(ck).model.state_dict().items():
        if value.dim() == 2 and "wpe" not in key:  # quantized: within half a step of each block's scale
            assert (back[key] - value).abs().max() <= value.abs().max() / 127, key
        else:
            assert torch.equal(back[key], value), key


def test_bad_files_are_one_line(tmp_path, capsys):
    (tmp_path / "not.gguf").write_bytes(b"hello, not a gguf file at all" * 10)
    for arch in ("falcon", "llama"):
        writer = gguf.GGUFWriter(tmp_path / f"{arch}.gguf", arch)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    for file, words in [("not.gguf", "is not a readable GGUF file"), ("falcon.gguf", "holds a 'falcon' model"),
                        ("llama.gguf", "has no llama.embedding_length; it is not a complete GGUF llama model"),
                        ("missing.gguf", "is not a file")]:
        assert main(["import-gguf", str(tmp_path / file), str(tmp_path / "out")]) == 1
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith("simplegpt import-gguf: error: ") and words in line, line
    assert not (tmp_path / "out").exists()


LLAMA_STYLE = dict(positions="rotary", norm="rmsnorm", mlp="swiglu", bias=False, rms_norm_eps=1e-5)


@pytest.mark.parametrize("style", [
    dict(LLAMA_STYLE, n_kv_head=1, tie_word_embeddings=False, bias=True, head_size=24, rope_theta=50000.0),
    dict(LLAMA_STYLE, n_kv_head=1),
    dict(LLAMA_STYLE, qk_norm=True, n_kv_head=1, rope_theta=1e6, rms_norm_eps=1e-6, intermediate_size=64),
], ids=["llama-untied-bias", "llama-tied", "qwen3"])
def test_llama_and_qwen3_files_come_back_as_they_were(tmp_path, style):
    tokenizer = train_bpe([" ".join(TEXTS) * 30], 300)
    ck, file = _exported(tmp_path, tokenizer, **style)
    back = import_gguf(file, tmp_path / "back")
    ours = load_checkpoint(ck)
    want, got = ours.config.to_dict(), back.config.to_dict()
    assert back.config.ffn_size == ours.config.ffn_size
    assert want.pop("intermediate_size") in (None, ours.config.ffn_size)
    got.pop("intermediate_size")
    assert got == want
    state = ours.model.state_dict()
    assert back.model.state_dict().keys() == state.keys()
    for key, value in back.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for text in TEXTS:
        assert back.tokenizer.encode(text) == tokenizer.encode(text), text


def test_an_embedding_padded_past_its_tokenizer_comes_back_without_the_padding_tokens(tmp_path):
    tokenizer = train_bpe([" ".join(TEXTS) * 30], 300)
    model = make_tiny_gpt(vocab_size=tokenizer.vocab_size + 20, **dict(LLAMA_STYLE, qk_norm=True))
    ck = save_checkpoint(tmp_path / "ck", model, tokenizer)
    back = import_gguf(export_gguf(ck, tmp_path / "m.gguf").path, tmp_path / "back")
    assert back.config.vocab_size == tokenizer.vocab_size + 20 and back.tokenizer.vocab_size == tokenizer.vocab_size
