"""The chat template: rendered in a sandbox, its ids equal transformers' apply_chat_template on the
exported tokenizer, its loss mask exactly the assistant's tokens and end-of-turn markers; the chat
markers added to a base vocabulary with embedding rows at the mean of the others."""

import json

import pytest
import torch

from conftest import make_tiny_gpt
from simplegpt import get_tokenizer, load_checkpoint, save_checkpoint
from simplegpt.chat import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError, PlainChat, chat_format
from simplegpt.chat.vocab import chat_tokenizer, grow_embeddings, prepare_chat_model
from simplegpt.errors import DataError
from simplegpt.hf_tokenizer import HFTokenizer, train_bpe

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "add 3 and 4"},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "and 5 and 6?"},
    {"role": "assistant", "content": "11, naïve 🎉"},
]


@pytest.fixture(scope="module")
def byte_chat() -> ChatTemplate:
    tok, added = chat_tokenizer(get_tokenizer("byte"))
    assert added == [257, 258] and tok.chat_template == CHATML_TEMPLATE
    return ChatTemplate(tok.chat_template, tok)


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    text = "Hello there, how are you? I am fine. add 3 and 4 gives 7. naïve café 日本 \n\n" * 30
    return train_bpe([text], 300)


def test_mask_is_exactly_the_assistant_tokens_and_end_markers(byte_chat):
    start, end = 257, 258  # the byte tokenizer's markers, added after its 256 bytes and end-of-text

    def turn(role: str, content: str, loss: bool) -> tuple[list[int], list[bool]]:
        head = [start, *f"{role}\n".encode()]
        body = [*content.encode(), end]
        return head + body + [*b"\n"], [False] * len(head) + [loss] * len(body) + [False]

    want_ids, want_mask = [], []
    for m in CONVERSATION:
        ids, mask = turn(m["role"], m["content"], m["role"] == "assistant")
        want_ids += ids
        want_mask += mask
    ids, mask = byte_chat.encode_with_mask(CONVERSATION)
    assert ids == want_ids and mask == want_mask
    # system and user tokens never carry loss; what does is the answers, each with its marker
    tok = byte_chat.tokenizer
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "7<|im_end|>11, naïve 🎉<|im_end|>"


def test_mask_on_a_bpe_and_user_typed_markers_stay_text(bpe):
    chat = ChatTemplate(CHATML_TEMPLATE, bpe)
    messages = [{"role": "user", "content": "say <|im_end|> then stop"}, {"role": "assistant", "content": "<|im_end|>"}]
    ids, mask = chat.encode_with_mask(messages)
    assert ids.count(bpe.token_id("<|im_end|>")) == 2  # the template's two; the typed ones are characters
    assert bpe.decode(ids) == chat.render(messages)
    answer = [i for i, m in zip(ids, mask) if m]
    assert bpe.decode(answer) == "<|im_end|><|im_end|>" and answer[-1] == bpe.token_id("<|im_end|>")
    assert len(answer) > 2  # the typed answer is several plain tokens, then the marker
    assert chat.stop == ("<|im_end|>", "<|endoftext|>") and chat.stop_ids == [2, 0]


def test_ids_equal_transformers_apply_chat_template_on_the_exported_tokenizer(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    from simplegpt.hf import export_hf

    tok = HFTokenizer(bpe.json, bpe.eos_id, kind="bpe", chat_template=CHATML_TEMPLATE)
    model = make_tiny_gpt(vocab_size=tok.vocab_size)
    ck = save_checkpoint(tmp_path / "ck", model, tok)
    assert load_checkpoint(ck).tokenizer.chat_template == CHATML_TEMPLATE  # kept with the checkpoint
    export_hf(ck, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == CHATML_TEMPLATE
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert isinstance(theirs, transformers.PreTrainedTokenizerFast)
    ours = ChatTemplate(CHATML_TEMPLATE, tok)
    for messages in (CONVERSATION, CONVERSATION[:2], [{"role": "user", "content": "  spaces\r\n\n tabs\t x "}]):
        for prompt in (False, True):
            text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert ours.render(messages, prompt) == text
            assert ours.encode(messages, prompt) == list(ids)
            assert tok.decode(ids) == text  # the round trip is exact


def test_the_template_runs_in_a_sandbox(byte_chat):
    tok = byte_chat.tokenizer
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        ChatTemplate(escape, tok).render(CONVERSATION)
    with pytest.raises(ChatTemplateError, match="chat template failed"):  # the messages cannot be changed
        ChatTemplate("{{ messages.append(1) }}", tok).render(CONVERSATION)
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        ChatTemplate("{% for %}", tok)
    with pytest.raises(ChatTemplateError, match="refused the messages: no"):
        ChatTemplate("{{ raise_exception('no') }}", tok).render(CONVERSATION)


def test_a_template_that_rewrites_history_is_refused_for_masks(byte_chat):
    # the last turn rendered differently from earlier ones: the assistant's tokens cannot be located
    odd = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ChatTemplateError, match="turn by turn"):
        ChatTemplate(odd, byte_chat.tokenizer).encode_with_mask(CONVERSATION)


def test_base_models_keep_the_plain_template(tmp_path):
    base = save_checkpoint(tmp_path / "base", make_tiny_gpt(vocab_size=257), get_tokenizer("byte"))
    fmt = chat_format(load_checkpoint(base).tokenizer)
    assert isinstance(fmt, PlainChat) and fmt.stop == ("\nUser:",)
    assert fmt.prompt_ids(CONVERSATION[:2]) == list(b"Be brief.\n\nUser: add 3 and 4\nAssistant:")


@pytest.mark.parametrize("name", ["byte", "gpt2"])
def test_markers_added_with_rows_at_the_mean_and_texts_keep_their_ids(name):
    base = get_tokenizer(name)
    model = make_tiny_gpt(vocab_size=base.vocab_size, scale=4.0)
    before = model.transformer.wte.weight.detach().clone()
    tok = prepare_chat_model(model, base)
    n = base.vocab_size
    assert tok.vocab_size == model.config.vocab_size == n + 2
    assert tok.encode("<|im_start|>x", specials=True) == [n, *base.encode("x")]
    assert tok.encode("Hello, naïve world\n\n") == base.encode("Hello, naïve world\n\n")
    wte = model.transformer.wte.weight
    assert torch.equal(wte[:n], before) and torch.allclose(wte[n:], before.mean(0).expand(2, -1))
    assert model.lm_head.weight is wte  # the tied head follows
    _, loss = model(torch.tensor([[n, n + 1, 5]]), torch.tensor([[n + 1, 5, n]]))
    assert torch.isfinite(loss)


def test_an_untied_head_grows_too_and_padding_rows_are_reset():
    model = make_tiny_gpt(vocab_size=260)  # 257 byte tokens and 3 rows of padding
    model.lm_head.weight = torch.nn.Parameter(torch.randn(260, 32))
    head = model.lm_head.weight.detach().clone()
    grow_embeddings(model, 262, [257, 258, 261])
    assert model.config.vocab_size == 262 and model.lm_head.weight.shape == (262, 32)
    keep = [i for i in range(260) if i not in (257, 258)]
    for i in (257, 258, 261):
        assert torch.allclose(model.lm_head.weight[i], head[keep].mean(0))
    assert torch.equal(model.lm_head.weight[259], head[259])
    assert model.lm_head.weight is not model.transformer.wte.weight


def test_a_char_vocabulary_cannot_take_the_markers():
    with pytest.raises(DataError, match="char tokenizer cannot hold the chat markers"):
        chat_tokenizer(get_tokenizer("char", "abc"))


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_an_imported_tokenizer_keeps_its_chat_template(bpe, tmp_path, where):
    import pickle

    from simplegpt.tokenizer import load_tokenizer

    (tmp_path / "tokenizer.json").write_text(bpe.json, encoding="utf-8")
    if where == "chat_template.jinja":
        (tmp_path / where).write_text(CHATML_TEMPLATE, encoding="utf-8")
    else:
        (tmp_path / where).write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE}))
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template == CHATML_TEMPLATE
    tok.save(tmp_path / "saved")  # as import-hf keeps it in a checkpoint
    again = load_tokenizer(tmp_path / "saved")
    assert again.chat_template == CHATML_TEMPLATE and again.eos_id == tok.eos_id
    assert pickle.loads(pickle.dumps(again)).chat_template == CHATML_TEMPLATE


def test_exported_generation_config_stops_transformers_generate_at_the_end_of_turn(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_chat_cli import chat_checkpoint

    from simplegpt.cli import main

    checkpoint = chat_checkpoint(tmp_path / "ends", ends_at_once=True)  # every greedy token is <|im_end|>
    assert main(["export-hf", str(checkpoint), str(tmp_path / "hf")]) == 0
    tok = load_checkpoint(checkpoint).tokenizer
    end = tok.token_id("<|im_end|>")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.eos_id, end]  # end-of-text, then end-of-turn
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == [end]  # one token, the marker: generate stopped there
    base = tmp_path / "base"  # a model without a template keeps its one end-of-text id
    save_checkpoint(base, make_tiny_gpt(vocab_size=257), get_tokenizer("byte"))
    assert main(["export-hf", str(base), str(tmp_path / "base_hf")]) == 0
    assert json.loads((tmp_path / "base_hf" / "generation_config.json").read_text())["eos_token_id"] == 256
