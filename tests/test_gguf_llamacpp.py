"""Parity of export-gguf files with llama.cpp itself (llama-server on 127.0.0.1): greedy tokens and
tokenization equal simplegpt's, and llama-server's chat replies equal `simplegpt serve`'s. Random
tiny models cover every tokenizer and architecture; checkpoints trained in seconds by simplegpt's own
trainer (a session fixture: a trained-BPE GPT-2 and Llama-style base, that base fine-tuned with
train --sft, and the quick start's character and byte models of the plays) give the greedy runs
and the q8_0 comparison margins that random models lack. Runs where SIMPLEGPT_LLAMA_CPP_BIN names the
folder of llama.cpp's built binaries (CI does not build llama.cpp; bench/gguf_parity.py runs the same
checks and prints them as a table), and skips otherwise."""

import importlib.util
import sys

import pytest

from conftest import ROOT, with_template

pytest.importorskip("gguf")
_spec = importlib.util.spec_from_file_location("gguf_parity", ROOT / "bench" / "gguf_parity.py")
parity = importlib.util.module_from_spec(_spec)
sys.modules["gguf_parity"] = parity
_spec.loader.exec_module(parity)

BIN = parity.llama_bin()
pytestmark = pytest.mark.skipif(BIN is None, reason=f"llama.cpp not found: set {parity.BIN_ENV} to the folder of its "
                                                    "built binaries (llama-server)")
TOKENIZERS = parity.tokenizers() if BIN is not None else {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """export(label, qtype, style="gpt2") -> (checkpoint, GGUF file): a random model of parity.STYLES[style]
    with tokenizer `label`, made once per module."""
    made = {}
    folder = tmp_path_factory.mktemp("gguf_parity")

    def export(label: str, qtype: str, style: str = "gpt2"):
        name = f"{label.replace(':', '')}-{style}"
        if name not in made:
            made[name] = parity.random_checkpoint(folder / name, TOKENIZERS[label], style=style)
        gguf = folder / f"{name}-{qtype}.gguf"
        if not gguf.exists():
            parity.export_gguf(made[name], gguf, type=qtype)
        return made[name], gguf

    return export


@pytest.mark.parametrize("label", ["gpt2", "bpe:512"])
def test_f32_greedy_tokens_equal_llama_cpp_for_64_tokens_from_3_prompts(exported, label):
    ck, gguf = exported(label, "f32")
    with parity.LlamaServer(gguf, BIN, n_ctx=256) as server:
        runs = parity.greedy_parity(ck, server)
    for run in runs:
        assert run.llama == run.ours, run  # 64 tokens, or fewer ending with end of text in both


@pytest.mark.parametrize("style", ["llama", "qwen3"])
def test_f32_greedy_tokens_of_llama_style_checkpoints_equal_llama_cpp(exported, style):
    """A trained-BPE model of GGUF's llama (GQA, untied head: its query/key rows reordered into rotation
    pairs) and of its qwen3 (QK-norm, 48-wide heads of a 64-wide model: attention.key_length)."""
    ck, gguf = exported("bpe:512", "f32", style)
    with parity.LlamaServer(gguf, BIN, n_ctx=256) as server:
        runs = parity.greedy_parity(ck, server)
    for run in runs:
        assert run.llama == run.ours, run


@pytest.mark.parametrize("label", ["hf-llama-bpe", "hf-qwen2", "byte", "char (ASCII)", "char (all scripts)"])
def test_f32_greedy_tokens_of_other_vocabularies_agree_up_to_near_ties(exported, label):
    """llama.cpp's CPU GELU goes through an f16 table, so a near tie (two logits closer than NEAR_TIE) may
    go either way; the tokens agree up to the first difference, and that difference is such a tie."""
    ck, gguf = exported(label, "f32")
    with parity.LlamaServer(gguf, BIN, n_ctx=256) as server:
        runs = parity.greedy_parity(ck, server)
    for run in runs:
        assert run.equal or (run.margin is not None and run.margin < parity.NEAR_TIE), run


@pytest.mark.parametrize("label", list(TOKENIZERS) or ["none"])
def test_llama_cpp_tokenizes_20_strings_as_simplegpt_does(exported, label):
    ck, gguf = exported(label, "f32")
    with parity.LlamaServer(gguf, BIN, n_ctx=256) as server:
        rows = parity.tokenize_parity(TOKENIZERS[label], server)
    assert len(rows) == len(parity.STRINGS) or label.startswith("char")  # a char vocabulary skips other scripts
    assert [(text, theirs) for text, _, theirs in rows] == [(text, ours) for text, ours, _ in rows]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """label -> checkpoint of parity.TRAINED, trained once per session (seconds of training each)."""
    return parity.trained_checkpoints(tmp_path_factory.mktemp("gguf_trained"))


def _gguf(trained, label: str, qtype: str):
    ck = trained[label]
    gguf = ck.parent / f"model-{qtype}.gguf"
    if not gguf.exists():
        parity.export_gguf(ck, gguf, type=qtype)
    return ck, gguf


@pytest.mark.parametrize("label", list(parity.TRAINED))
def test_f32_greedy_tokens_of_trained_checkpoints_equal_llama_cpp(trained, label):
    """64 tokens from each of 3 prompts (the chat checkpoint: 3 conversations in its template, each
    reply ending at <|im_end|> in both), every token equal: a trained model decides by margins that
    llama.cpp's f16 GELU table cannot flip."""
    ck, gguf = _gguf(trained, label, "f32")
    with parity.LlamaServer(gguf, BIN, n_ctx=256) as server:
        runs = parity.greedy_parity(ck, server)
    for run in runs:
        assert run.llama == run.ours, run
    if label.startswith("chat"):
        stop = parity.stop_ids(parity.load_checkpoint(ck).tokenizer)[1]  # <|im_end|>
        assert any(run.ours[-1] == stop for run in runs), runs  # the fine-tuned model ends its turn
    else:
        assert all(len(run.ours) == parity.NEW_TOKENS for run in runs), runs


@pytest.mark.parametrize("label", ["char (plays)", "byte (plays)"])
def test_the_quick_starts_char_and_byte_models_tokenize_as_in_llama_cpp(trained, label):
    """The character vocabulary of the plays holds the em dash (3 UTF-8 bytes, rebuilt by a merge
    chain), so the 20 strings are the plays' characters with em dashes, whitespace runs and newlines;
    the byte model gets those and the 20 strings of every script."""
    ck, gguf = _gguf(trained, label, "f32")
    tok = parity.load_checkpoint(ck).tokenizer
    assert label.startswith("byte") or "—" in tok.chars
    with parity.LlamaServer(gguf, BIN, n_ctx=256) as server:
        rows = parity.tokenize_parity(tok, server, parity.CHAR_STRINGS)
        if label.startswith("byte"):
            rows += parity.tokenize_parity(tok, server)
    assert len(rows) == len(parity.CHAR_STRINGS) * (1 if label.startswith("char") else 2)
    assert [(text, theirs) for text, _, theirs in rows] == [(text, ours) for text, ours, _ in rows]


@pytest.mark.parametrize("label", list(parity.TRAINED))
def test_q8_0_greedy_tokens_of_trained_checkpoints_against_simplegpts_int8(trained, label, capsys):
    """Both round to 8 bits, differently (Q8_0: blocks of 32 with an f16 scale, activations too;
    simplegpt: one scale per weight row and per activation row), so a near tie may go either way: how
    many tokens agree before the first difference is printed, and at least half of them must (random
    models agreed on 4 to 86 of up to 192). Where llama.cpp's repacked q8_0 kernels die of SIGILL (seen on
    this project's hosts), llama-server runs with --no-repack."""
    ck, gguf = _gguf(trained, label, "q8_0")
    runs, vs_f32, how = parity.q8_0_greedy(ck, gguf, BIN)
    same, total = sum(r.agree for r in runs), sum(len(r.ours) for r in runs)
    with capsys.disabled():
        print(f"\n{label} q8_0 ({how}): {same}/{total} greedy tokens agree with simplegpt's int8 before the first "
              f"difference ({[r.agree for r in runs]}); with its f32 {[r.agree for r in vs_f32]}")
    assert 2 * same >= total, runs


def test_llama_server_chats_with_the_template_stored_in_the_checkpoint(tmp_path):
    """The checkpoint's chat template (a Jinja template, Hugging Face's convention) goes into
    tokenizer.chat_template: llama-server renders messages with it, and its special tokens are the
    vocabulary's control tokens, the ids simplegpt gives them."""
    from simplegpt.checkpoint import load_checkpoint, save_checkpoint

    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = TOKENIZERS["bpe:512"]
    ck = parity.random_checkpoint(tmp_path / "chat", tok)
    save_checkpoint(ck, load_checkpoint(ck).model, with_template(tok, template))
    gguf = parity.export_gguf(ck, tmp_path / "chat.gguf").path
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add 3 and 4"}]
    with parity.LlamaServer(gguf, BIN, n_ctx=256) as server:
        prompt = server.post("/apply-template", {"messages": messages})["prompt"]
        ids = server.post("/tokenize", {"content": prompt, "parse_special": True})["tokens"]
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nadd 3 and 4<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert ids == tok.encode(prompt, specials=True) and ids.count(tok.encode("<|im_start|>", specials=True)[0]) == 3


def test_llama_server_chat_replies_as_simplegpt_serve_does(trained):
    """The fine-tuned chat checkpoint (the Llama-style base after train --sft; its tokenizer carries the
    ChatML template): llama-server's /v1/chat/completions, with the template from the file, and
    `simplegpt serve`'s, both real servers at temperature 0, reply the same to 3 conversations."""
    ck, gguf = _gguf(trained, "chat (llama, sft)", "f32")
    chats = parity.chat_parity(ck, gguf, BIN)
    for chat in chats:
        assert chat.ours == chat.llama, chat
    assert all(chat.ours for chat in chats)
