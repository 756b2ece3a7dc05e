"""`simplegpt chat` in a real subprocess on tiny checkpoints: replies are the engine's over the chat
template, /reset and /save work, the history is cut from its oldest turn (saying so), a reply stops
at the end-of-turn marker."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_gpt
from simplegpt import get_tokenizer, load_checkpoint, save_checkpoint
from simplegpt.chat import chat_format
from simplegpt.chat.vocab import prepare_chat_model
from simplegpt.engine import Engine, SamplingParams

MAX_NEW = 8


def chat_checkpoint(path: Path, n_positions: int = 256, ends_at_once: bool = False) -> Path:
    """A tiny random byte-level model with the chat markers and ChatML; ends_at_once: its every
    greedy token is <|im_end|> (the head's input is one vector, closest to that token's row)."""
    model = make_tiny_gpt(seed=0, scale=4.0, vocab_size=257, n_positions=n_positions)
    tok = prepare_chat_model(model, get_tokenizer("byte"))
    if ends_at_once:
        with torch.no_grad():
            end = tok.token_id("<|im_end|>")
            model.transformer.wte.weight[end] = 3.0 * torch.nn.functional.normalize(torch.randn(32), dim=0)
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.copy_(10 * model.transformer.wte.weight[end])
    return save_checkpoint(path, model, tok)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return chat_checkpoint(tmp_path_factory.mktemp("chat") / "tiny")


def chat(checkpoint: Path, lines: list[str], *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simplegpt", "chat", "--checkpoint", str(checkpoint),
                           "--temperature", "0", "--max-new-tokens", str(MAX_NEW), *extra],
                          input="".join(f"{line}\n" for line in lines), capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def reply(checkpoint: Path, messages: list[dict]) -> str:
    ck = load_checkpoint(checkpoint)
    fmt = chat_format(ck.tokenizer)
    [r] = Engine(ck.model, ck.tokenizer).generate([fmt.prompt_ids(messages)], SamplingParams(
        max_new_tokens=MAX_NEW, temperature=0, stop=fmt.stop))
    return r.text


def saved(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["messages"]


def test_a_session_with_reset_and_save(checkpoint, tmp_path):
    out = chat(checkpoint, ["hello there", "how are you?", "/save one.json", "/reset", "hi", "/save two.json"],
               "--system", "Be kind.", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    system = {"role": "system", "content": "Be kind."}
    first = [system, {"role": "user", "content": "hello there"}]
    first.append({"role": "assistant", "content": reply(checkpoint, first)})
    first.append({"role": "user", "content": "how are you?"})
    first.append({"role": "assistant", "content": reply(checkpoint, first)})
    assert saved(tmp_path / "one.json") == first  # the replies are the engine's over the template
    second = [system, {"role": "user", "content": "hi"}]
    second.append({"role": "assistant", "content": reply(checkpoint, second)})
    assert saved(tmp_path / "two.json") == second  # /reset kept only the system prompt
    assert "saved 5 messages to one.json" in out.stderr and "the conversation starts over" in out.stderr
    assert out.stdout == "".join(m["content"] + "\n" for m in first + second if m["role"] == "assistant")


def test_history_is_cut_from_the_oldest_turn_saying_so_and_replies_stop_at_the_marker(tmp_path):
    ends = chat_checkpoint(tmp_path / "ends", n_positions=96, ends_at_once=True)
    out = chat(ends, ["first question", "second question", "third question", "/save s.json", "/nope"],
               "--system", "S", cwd=tmp_path)
    assert out.returncode == 1  # /nope: an unknown command is an error line, and the session went on
    assert "unknown command /nope" in out.stderr
    assert "the conversation outgrew the model's context of 96 tokens: the oldest 2 messages left out" in out.stderr
    messages = saved(tmp_path / "s.json")
    assert messages == [{"role": "system", "content": "S"},  # the system prompt stays
                        {"role": "user", "content": "second question"}, {"role": "assistant", "content": ""},
                        {"role": "user", "content": "third question"}, {"role": "assistant", "content": ""}]
    # each reply ended at once: the model's first token is <|im_end|>, which is not shown
    assert out.stdout == "\n\n\n" and "<|im_end|>" not in out.stdout


def test_a_doubled_slash_sends_a_message_that_starts_with_one_and_help_says_so(checkpoint, tmp_path):
    out = chat(checkpoint, ["/help", "//reset the plan", "/save s.json"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "//help sends /help" in out.stderr and "/reset" in out.stderr  # /help lists the commands and the escape
    messages = saved(tmp_path / "s.json")
    user = [{"role": "user", "content": "/reset the plan"}]  # sent, not taken for /reset
    assert messages == [*user, {"role": "assistant", "content": reply(checkpoint, user)}]


def test_info_shows_the_llama_style_options_and_whether_a_chat_template_is_stored(checkpoint, tmp_path, capsys):
    from simplegpt.cli import main

    model = make_tiny_gpt(vocab_size=257, n_kv_head=1, positions="rotary", rope_theta=500000.0, norm="rmsnorm",
                          mlp="swiglu", intermediate_size=64, bias=False, qk_norm=True, tie_word_embeddings=False)
    llama = save_checkpoint(tmp_path / "llama", model, get_tokenizer("byte"))
    assert main(["info", str(llama)]) == 0
    out = capsys.readouterr().out
    assert ("architecture: rotary positions (rope_theta 500000), rmsnorm (eps 1e-06), MLP swiglu (intermediate_size "
            "64), n_kv_head 1 of 2 heads, head_dim 16, qk_norm true, tie_word_embeddings false") in out, out
    assert "chat template: none" in out
    assert main(["info", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "architecture: GPT-2" in out and "chat template: stored" in out, out
    assert main(["info", str(checkpoint), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chat_template"] is True
