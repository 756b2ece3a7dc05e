"""Every command's --help says each option's default once: an option whose help says it in words does
not get argparse's '(default: None)' after it."""

import argparse
import json
import re

import pytest

from simplegpt.cli import build_parser


def test_no_option_says_its_default_twice():
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(commands.choices) > 10
    for name, command in commands.choices.items():
        text = re.sub(r"\s+", " ", command.format_help())
        assert not re.search(r"\(default:[^()]*(\([^()]*\)[^()]*)*\) \(default:", text), name
    export = re.sub(r"\s+", " ", commands.choices["export-gguf"].format_help())
    assert "(default: for models of 256 MB of f32 weights or more)" in export and "(default: None)" not in export


def test_import_gguf_names_its_output_as_its_help_speaks_of_it():
    [commands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    text = commands.choices["import-gguf"].format_help()
    assert "FILE.gguf OUT" in text and "replace OUT" in text


@pytest.mark.parametrize("qk_norm, model_class", [(False, "LlamaForCausalLM"), (True, "Qwen3ForCausalLM")])
def test_export_hf_of_a_llama_style_char_model_names_the_class_that_loads_it(qk_norm, model_class, tmp_path,
                                                                              capsys):
    from simplegpt.checkpoint import save_checkpoint
    from simplegpt.cli import main
    from simplegpt.model import GPT, GPTConfig
    from simplegpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text("to be or not to be")
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16, n_positions=16,
                          bias=False, positions="rotary", norm="rmsnorm", mlp="swiglu", qk_norm=qk_norm))
    save_checkpoint(tmp_path / "ck", model, tokenizer)
    assert main(["export-hf", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 0
    warning = capsys.readouterr().err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [model_class]
    assert "AutoTokenizer cannot load" in warning and f"{model_class} (or AutoModelForCausalLM) loads" in warning
    assert "GPT2LMHeadModel" not in warning
    help_text = re.sub(r"\s+", " ", build_parser()._subparsers._group_actions[0].choices["export-hf"].format_help())
    assert "so AutoModelForCausalLM.from_pretrained(OUT)" in help_text


def test_a_command_given_a_hugging_face_folder_it_cannot_take_says_how_to_convert_it(tmp_path, capsys):
    """generate/info take simplegpt checkpoints only: a Llama-style export-hf folder got "not a simplegpt
    checkpoint config" without the way out; eval and --init-from, which take one, say so in --help."""
    from simplegpt.checkpoint import save_checkpoint
    from simplegpt.cli import main
    from simplegpt.model import GPT, GPTConfig
    from simplegpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text("to be or not to be")
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16, n_positions=16,
                          bias=False, positions="rotary", norm="rmsnorm", mlp="swiglu"))
    save_checkpoint(tmp_path / "ck", model, tokenizer)
    assert main(["export-hf", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"Hugging Face model (model_type 'llama'): convert it with 'simplegpt import-hf" in err
    [commands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name in ("eval", "train"):
        assert "GPT-2, Llama or Qwen3" in re.sub(r"\s+", " ", commands.choices[name].format_help()), name
