import pytest

from simplegpt import ByteTokenizer, CharTokenizer, GPT2Tokenizer, get_tokenizer, load_tokenizer


def test_gpt2_ids_match_gpt2():
    tok = GPT2Tokenizer()
    assert tok.encode("Hello, how are you?") == [15496, 11, 703, 389, 345, 30]
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.decode([15496, 11, 703, 389, 345, 30]) == "Hello, how are you?"
    # The special token's text in user input is plain text, not EOS.
    assert tok.eos_id not in tok.encode("<|endoftext|>")


@pytest.mark.parametrize("name", ["gpt2", "char", "byte"])
def test_round_trip_tinyshakespeare(name, shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    tok = get_tokenizer(name, text=text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert max(ids) < tok.vocab_size


def test_gpt2_batch_equals_single(shakespeare_path):
    lines = shakespeare_path.read_text(encoding="utf-8").split("\n\n")[:500]
    tok = GPT2Tokenizer()
    assert tok.encode_batch(lines) == [tok.encode(t) for t in lines]


def test_char_tokenizer_save_load(tmp_path, shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 66  # 65 characters + EOS
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer)
    sample = text[:5000]
    assert again.encode(sample) == tok.encode(sample)
    assert again.eos_id == tok.eos_id


def test_char_tokenizer_unknown_character():
    tok = CharTokenizer.from_text("abc ")
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("a z")
    fallback = CharTokenizer("abc ", unk=" ")
    assert fallback.encode("azb") == fallback.encode("a b")


def test_byte_tokenizer_any_text_and_eos():
    tok = ByteTokenizer()
    text = "naïve café — 東京 🎭"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("ab") + [tok.eos_id]) == "ab"


@pytest.mark.parametrize("name", ["gpt2", "byte"])
def test_save_load_all_kinds(tmp_path, name):
    tok = get_tokenizer(name)
    tok.save(tmp_path)
    assert type(load_tokenizer(tmp_path)) is type(tok)


def test_bad_tokenizer_input(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.from_text("")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="out of range"):
        ByteTokenizer().decode([300])
