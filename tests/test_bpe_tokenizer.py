"""The `tokenizers`-backed tokenizer: a byte-level BPE trained by prepare, and imported tokenizer.json files."""

import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, make_tiny_gpt
from simplegpt import GPT2Tokenizer, load_checkpoint, load_tokenizer, save_checkpoint
from simplegpt.config import TrainConfig, default_out_dir
from simplegpt.data.encoding import Encoder
from simplegpt.data.prepare import parse_size, prepare_corpus
from simplegpt.data.shards import read_meta
from simplegpt.errors import ConfigError, DataError
from simplegpt.hf_tokenizer import HF_FILE, SPECIAL_TOKENS, HFTokenizer, parse_bpe_name, train_bpe
from simplegpt.tokenizer import SPEC_FILE, get_tokenizer
from simplegpt.trainer import dataset_dir

MULTILINGUAL = ("Grüße aus Köln — naïve café. Ελληνικά κείμενα. Русский текст. 日本語のテキスト。"
                "中文文本。한국어 텍스트. العربية. हिन्दी. 🎭🚀👩‍👩‍👧 ✓\r\n\tend")
TRICKY = ["", " ", "   ", "\n\n\n", "\r\n", "a\r\nb\r\n", "\x00", "a\x00b", "\t \t\n ", "x" * 300,
          "😀", "👩‍👩‍👧‍👦", "e\u0301", "\ufeffBOM", "\U0010ffff", "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>",
          "<|endoftext", "  leading", "trailing  ", MULTILINGUAL]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}  # the subprocess imports this copy of simplegpt


@pytest.fixture(scope="module")
def corpus_text(shakespeare_path):
    return shakespeare_path.read_text(encoding="utf-8")[:60_000] + "\n" + MULTILINGUAL * 3


@pytest.fixture(scope="module")
def bpe(corpus_text):
    return train_bpe([corpus_text], 400)


def _random_text(rng: random.Random, n: int) -> str:
    """n random code points from all planes (no surrogates: not valid Unicode), biased to white space."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.2:
            out.append(rng.choice(" \t\n\r\x00\x0b\x0c\x85\u00a0\u2028\u3000"))
        elif r < 0.5:
            out.append(chr(rng.randrange(32, 127)))
        else:
            cp = rng.randrange(0, 0x110000)
            out.append(chr(cp if not 0xD800 <= cp < 0xE000 else cp - 0x800))
    return "".join(out)


def test_round_trip_is_exact_for_any_string(bpe):
    rng = random.Random(0)
    texts = TRICKY + [_random_text(rng, rng.randrange(1, 80)) for _ in range(400)]
    for text in texts:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text, repr(text)
        assert bpe.decode_bytes(ids) == text.encode("utf-8")
        assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]
    # decode_bytes per token is exact, so streaming can stop inside a character
    ids = bpe.encode("😀")
    assert b"".join(bpe.decode_bytes([i]) for i in ids) == "😀".encode()


def test_special_token_text_is_plain_unless_asked(bpe):
    assert bpe.eos_id == 0 and [bpe.decode([i]) for i in range(3)] == list(SPECIAL_TOKENS)
    for marker in SPECIAL_TOKENS:
        ids = bpe.encode(f"a {marker} b")
        assert not set(ids) & {0, 1, 2}  # the same rule as GPT-2's tokenizer
        assert bpe.decode(ids) == f"a {marker} b"
    assert GPT2Tokenizer().eos_id not in GPT2Tokenizer().encode("<|endoftext|>")
    chat = bpe.encode("<|im_start|>user\nhi<|im_end|><|endoftext|>", specials=True)
    assert chat[0] == 1 and chat[-2:] == [2, 0]
    assert bpe.encode_batch(["<|im_end|>"], specials=True) == [[2]]


def test_vocabulary_sizes(corpus_text):
    smallest = train_bpe([corpus_text], 256)  # the bytes only: no merge
    assert smallest.vocab_size == 256 + len(SPECIAL_TOKENS)
    assert smallest.decode(smallest.encode(MULTILINGUAL)) == MULTILINGUAL
    assert len(smallest.encode("hello")) == 5
    bigger = train_bpe([corpus_text], 512)
    assert bigger.vocab_size == 512 + len(SPECIAL_TOKENS)
    assert len(bigger.encode(corpus_text)) < len(smallest.encode(corpus_text)) / 2


def test_training_is_deterministic(corpus_text, tmp_path):
    a = train_bpe([corpus_text], 450)
    assert train_bpe([corpus_text], 450).json == a.json
    assert train_bpe([corpus_text[::-1]], 450).json != a.json
    # and in another process (Rust's hash maps are seeded per process)
    (tmp_path / "c.txt").write_text(corpus_text, encoding="utf-8")
    code = ("import sys; from simplegpt.hf_tokenizer import train_bpe; "
            "print(train_bpe([open(sys.argv[1], encoding='utf-8', newline='').read()], 450).sha256)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.txt")], env=_env(), capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == a.sha256


def test_save_load_and_damage(bpe, tmp_path):
    bpe.save(tmp_path)
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    assert spec["type"] == "bpe" and spec["file"] == HF_FILE and spec["vocab_size"] == bpe.vocab_size
    again = load_tokenizer(tmp_path)
    assert isinstance(again, HFTokenizer) and again.spec() == bpe.spec()
    assert again.encode(MULTILINGUAL) == bpe.encode(MULTILINGUAL)
    clone = pickle.loads(pickle.dumps(bpe))  # how worker processes get it
    assert clone.encode(MULTILINGUAL) == bpe.encode(MULTILINGUAL) and clone.kind == "bpe"
    encoder = pickle.loads(pickle.dumps(Encoder(bpe, np.dtype(np.uint16))))  # a spawned prepare worker's
    assert encoder([MULTILINGUAL])[0].tolist() == bpe.encode(MULTILINGUAL) + [bpe.eos_id]
    text = (tmp_path / HF_FILE).read_text(encoding="utf-8")
    (tmp_path / HF_FILE).write_text(text[:len(text) // 2], encoding="utf-8")  # cut short
    with pytest.raises(ValueError, match="damaged"):
        load_tokenizer(tmp_path)
    (tmp_path / HF_FILE).unlink()
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)


def _imported_tokenizer_json(tmp_path, corpus_text):
    """A Qwen-style tokenizer.json built here (no download): byte-level BPE, prefix space off, ChatML
    specials, a BOS-less post-processor; with a tokenizer_config.json naming <|im_end|> as EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus_text, MULTILINGUAL * 20], trainer=trainer)
    folder = tmp_path / "imported"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return folder


def test_imported_tokenizer_json_matches_transformers(tmp_path, corpus_text):
    from transformers import PreTrainedTokenizerFast

    folder = _imported_tokenizer_json(tmp_path, corpus_text)
    ours = HFTokenizer.from_file(folder / "tokenizer.json")
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert ours.kind == "hf" and ours.eos_id == theirs.convert_tokens_to_ids("<|im_end|>")
    for text in [MULTILINGUAL, "Hello, world! 🎉🎉 日本語とEnglish mixed\n\n  spaces", corpus_text[:3000]]:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids) == text
    # a folder whose tokenizer.json is a Hugging Face one loads as it is; saved, it loads again
    assert load_tokenizer(folder).encode(MULTILINGUAL) == ours.encode(MULTILINGUAL)
    ours.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").spec() == ours.spec()
    (folder / "tokenizer_config.json").unlink()
    assert HFTokenizer.from_file(folder / "tokenizer.json").eos_id == 0  # <|endoftext|>
    with pytest.raises(ValueError, match="no end-of-sequence"):
        HFTokenizer.from_file(folder / "tokenizer.json", eos_token="</s>")
    (folder / "x.json").write_text('{"type": "char"}')
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        HFTokenizer.from_file(folder / "x.json")


def test_imported_sentencepiece_style_tokenizer_json(tmp_path, corpus_text):
    """A Llama-2-style file: '▁' for spaces, byte fallback to <0xNN> tokens, a decoder that strips the
    space the normalizer put before the text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([corpus_text], trainer=trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                                       show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = HFTokenizer.from_file(tmp_path / "tokenizer.json")
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert ours.eos_id == 2  # </s>
    for text in [MULTILINGUAL, "  two spaces", "x", corpus_text[:2000]]:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids) == text
        assert ours.decode_bytes(ids) == b" " + text.encode("utf-8")  # the streamed bytes keep the space


def test_prepare_trains_and_workers_agree(tmp_path, corpus_text):
    src = tmp_path / "texts"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.txt").write_text(corpus_text[i * 20_000:(i + 1) * 20_000] + MULTILINGUAL, encoding="utf-8")
    one = prepare_corpus(str(src), tmp_path / "d1", "bpe:300", workers=1, progress=False, tokenizer_sample=30_000)
    two = prepare_corpus(str(src), tmp_path / "d2", "bpe:300", workers=2, progress=False, tokenizer_sample=30_000)
    assert one["tokenizer"]["type"] == "bpe" and one["vocab_size"] == 303 and one["tokenizer_sample"] == 30_000
    assert one["tokenizer"] == two["tokenizer"]
    for split in ("train", "val"):
        for a, b in zip(one["shards"][split], two["shards"][split]):
            assert (tmp_path / "d1" / a["file"]).read_bytes() == (tmp_path / "d2" / b["file"]).read_bytes()
    tok = load_tokenizer(tmp_path / "d1" / "tokenizer")
    stream = np.fromfile(tmp_path / "d1" / one["shards"]["train"][0]["file"], dtype=one["dtype"])
    first_doc = stream[:list(stream).index(tok.eos_id)].tolist()
    assert tok.decode(first_doc) == (src / "0.txt").read_text(encoding="utf-8")
    # a smaller sample is another tokenizer (the sample is part of what makes the dataset)
    other = prepare_corpus(str(src), tmp_path / "d1", "bpe:300", workers=1, progress=False, tokenizer_sample=5_000)
    assert other["tokenizer"]["sha256"] != one["tokenizer"]["sha256"]
    with pytest.raises(DataError, match="at least 256"):
        prepare_corpus(str(src), tmp_path / "d3", "bpe:100", progress=False)


def test_prepare_cli_train_and_generate(tmp_path, corpus_text, monkeypatch, capsys):
    from simplegpt.cli import main

    (tmp_path / "t.txt").write_text(corpus_text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "t.txt", "--tokenizer", "bpe:320", "--tokenizer-sample", "40kB", "-j", "1"]) == 0
    assert "trained a BPE tokenizer of 323 tokens on 40,000 bytes" in capsys.readouterr().err
    meta = read_meta(tmp_path / "data" / "t_bpe320")
    assert meta["tokenizer_request"] == "bpe:320" and meta["vocab_size"] == 323
    assert main(["train", "--data", "data/t_bpe320", "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1",
                 "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--out_dir", "run",
                 "--device", "cpu"]) == 0
    ck = load_checkpoint(tmp_path / "run" / "best")
    assert isinstance(ck.tokenizer, HFTokenizer) and ck.tokenizer.spec() == meta["tokenizer"]
    capsys.readouterr()
    assert main(["generate", "--checkpoint", "run/best", "--prompt", "Grüße 🎭", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("Grüße 🎭")
    for args, message in [(["--tokenizer", "bpe:100"], "at least 256 tokens"),
                          (["--tokenizer", "bpe:abc"], "write bpe:N"),
                          (["--tokenizer", "bpe"], "write bpe:N"),
                          (["--tokenizer", "sentencepiece"], "unknown tokenizer"),
                          (["--tokenizer", "bpe:300", "--tokenizer-sample", "lots"], "is not a size"),
                          (["--tokenizer-sample", "1MB"], "--tokenizer bpe:N")]:
        assert main(["prepare", "t.txt", "-o", "bad", *args]) != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / "bad").exists()


def test_export_hf_writes_a_fast_tokenizer(bpe, tmp_path):
    from transformers import AutoTokenizer

    from simplegpt.hf import export_hf

    model = make_tiny_gpt(vocab_size=bpe.vocab_size)
    save_checkpoint(tmp_path / "ck", model, bpe)
    result = export_hf(tmp_path / "ck", tmp_path / "hf")
    assert result.tokenizer_exported
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert theirs(MULTILINGUAL, add_special_tokens=False)["input_ids"] == bpe.encode(MULTILINGUAL)
    assert theirs.eos_token_id == bpe.eos_id


def test_names_and_sizes():
    assert parse_bpe_name("bpe:8192") == 8192 and parse_bpe_name("gpt2") is None
    for bad in ("bpe:100", "bpe:abc", "bpe:", "bpe8192", "bpe:-300"):
        with pytest.raises(ValueError):
            parse_bpe_name(bad)
    with pytest.raises(ConfigError, match="at least 256"):
        TrainConfig(tokenizer="bpe:12")
    cfg = TrainConfig(data="notes.txt", tokenizer="bpe:512")  # train --data notes.txt --tokenizer bpe:512
    assert str(dataset_dir(cfg)) == os.path.join("data", "notes_bpe512")
    assert default_out_dir("notes.txt", "bpe:512") == os.path.join("out", "notes_bpe512")
    with pytest.raises(ValueError, match="needs a corpus"):
        get_tokenizer("bpe:300")
    assert get_tokenizer("bpe:300", text="abc abc abd").vocab_size <= 303
    assert [parse_size(s) for s in ("100MB", "1.5GB", "500kB", "100M", "100B", "1000")] == \
        [10**8, 15 * 10**8, 500_000, 10**8, 100, 1000]
    with pytest.raises(ValueError):
        parse_size("ten")
