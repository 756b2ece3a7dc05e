"""Parity of export-gguf files with llama.cpp itself (llama-server on 127.0.0.1): greedy tokens and
tokenization equal simplegpt's. Runs where SIMPLEGPT_LLAMA_CPP_BIN names the folder of llama.cpp's
built binaries (CI does not build llama.cpp; bench/gguf_parity.py runs the same checks and prints
them as a table), and skips otherwise."""

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


@pytest.mark.parametrize("label", ["hf-llama-bpe", "hf-qwen2", "byte", "char (ASCII)"])
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


@pytest.mark.parametrize("label, style", [("gpt2", "gpt2"), ("bpe:512", "gpt2"), ("bpe:512", "llama"),
                                          ("bpe:512", "qwen3")])
def test_q8_0_greedy_tokens_against_simplegpts_int8(exported, label, style, capsys):
    """Both round to 8 bits, differently (Q8_0: blocks of 32 with an f16 scale, activations too;
    simplegpt: one scale per weight row and per activation row), and these random models amplify
    rounding, so how long the tokens agree is printed, not asserted. Where llama.cpp's repacked q8_0
    kernels die of SIGILL (seen on this project's hosts), llama-server runs with --no-repack."""
    ck, gguf = exported(label, "q8_0", style)
    runs, vs_f32, how = parity.q8_0_greedy(ck, gguf, BIN)
    with capsys.disabled():
        print(f"\n{label} ({style}) q8_0 ({how}): {sum(r.agree for r in runs)}/{sum(len(r.ours) for r in runs)} "
              "greedy tokens "
              f"agree with int8 before the first difference ({[r.agree for r in runs]}); with f32 "
              f"{[r.agree for r in vs_f32]}")
    vocab = TOKENIZERS[label].vocab_size
    assert all(0 < len(r.llama) <= parity.NEW_TOKENS and all(0 <= t < vocab for t in r.llama) for r in runs)


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


def test_llama_server_chat_replies_as_simplegpt_serve_does(tmp_path):
    """A chat checkpoint (a Llama-style model whose tokenizer carries a ChatML template): the replies of
    llama-server's /v1/chat/completions and of `simplegpt serve`'s, both real servers at temperature 0,
    to 3 conversations. They are equal, or differ first where simplegpt's greedy token wins by less than
    NEAR_TIE (random tiny models have such ties; bench/gguf_parity.py prints the margins)."""
    ck = parity.chat_checkpoint(tmp_path / "chat", TOKENIZERS["bpe:512"])
    gguf = parity.export_gguf(ck, tmp_path / "chat.gguf").path
    chats = parity.chat_parity(ck, gguf, BIN)
    assert sum(c.equal for c in chats) >= 2, chats
    for chat in chats:
        assert chat.equal or (chat.margin is not None and chat.margin < parity.NEAR_TIE), chat
