"""Evaluation: sliding windows, parity with Hugging Face's own loss, bits per byte, the eval command."""

import json
import math

import pytest
import torch

from conftest import make_tiny_gpt
from simplegpt import GPT
from simplegpt.checkpoint import save_checkpoint
from simplegpt.cli import main
from simplegpt.errors import DataError
from simplegpt.evaluation.perplexity import evaluate_ids, evaluate_text, load_eval_tokens, sliding_windows
from simplegpt.tokenizer import ByteTokenizer, GPT2Tokenizer

TEXT = (
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. "
    "The evil that men do lives after them; the good is oft interred with their bones; so let it be "
    "with Caesar. The noble Brutus hath told you Caesar was ambitious: if it were so, it was a "
    "grievous fault, and grievously hath Caesar answer'd it."
)


@pytest.mark.parametrize("n, context, stride", [(10, 4, 2), (10, 4, 1), (11, 4, 3), (3, 8, 4), (100, 16, 7)])
def test_windows_score_every_token_once_with_enough_context(n, context, stride):
    windows = sliding_windows(n, context, stride)
    scored = [j for w in windows for j in range(w.first, w.end)]
    assert scored == list(range(1, n))  # every token but the first, once, in order
    for w in windows:
        assert w.end - w.begin <= context
        if w.begin > 0:  # scored tokens see at least context - stride tokens before them
            assert w.first - w.begin >= context - stride


def test_stride_equal_to_context_leaves_window_starts_unscored():
    # as in the Hugging Face recipe: the first token of a window has nothing to predict it
    windows = sliding_windows(12, 4, 4)
    assert [j for w in windows for j in range(w.first, w.end)] == [1, 2, 3, 5, 6, 7, 9, 10, 11]


@pytest.mark.parametrize("args", [(10, 1, 1), (10, 4, 0), (10, 4, 5), (1, 4, 2)])
def test_bad_windows(args):
    with pytest.raises(ValueError):
        sliding_windows(*args)


def tiny_model(vocab_size: int, n_positions: int = 32) -> GPT:
    return make_tiny_gpt(vocab_size=vocab_size, n_positions=n_positions, n_head=4, jitter=0.05).eval()


def hf_recipe_loss(hf_model, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity recipe, written from its documentation: windows of `context`
    tokens, `stride` apart, earlier tokens masked with -100, the model's own `labels` loss."""
    seq = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq.size(1), stride):
        end = min(begin + context, seq.size(1))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf_model(input_ids, labels=target_ids).loss
        n = int((target_ids[:, 1:] != -100).sum())  # the model shifts labels left by one
        nll_sum += loss.item() * n
        n_tokens += n
        prev_end = end
        if end == seq.size(1):
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("stride, bos", [(8, True), (16, False), (32, True)])
def test_eval_command_matches_hf_loss_on_the_same_windows(stride, bos, tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="needs the 'hf' extra")
    from simplegpt.hf import export_hf

    tok = GPT2Tokenizer()
    save_checkpoint(tmp_path / "ck", tiny_model(tok.vocab_size), tok)
    export_hf(tmp_path / "ck", tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    argv = ["eval", "--checkpoint", str(tmp_path / "ck"), "--data", str(tmp_path / "text.txt"),
            "--stride", str(stride), "--json", "--device", "cpu"] + ([] if bos else ["--no-bos"])
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    ids = ([tok.eos_id] if bos else []) + tok.encode(TEXT)
    assert len(ids) > 2 * 32  # several windows
    want, n_tokens = hf_recipe_loss(hf, ids, context=32, stride=stride)
    assert got["tokens"] == n_tokens
    assert abs(got["loss"] - want) < 1e-4
    assert math.isclose(got["perplexity"], math.exp(want), rel_tol=1e-4)


def test_bits_per_byte_of_a_byte_model_is_loss_in_bits():
    tok = ByteTokenizer()
    result = evaluate_text(tiny_model(tok.vocab_size), tok, "naïve café " * 8, stride=16)
    assert result.bytes == len(("naïve café " * 8).encode()) == result.tokens
    assert math.isclose(result.bits_per_byte, result.loss / math.log(2), rel_tol=1e-9)


def test_batching_and_padding_do_not_change_the_result():
    tok = GPT2Tokenizer()
    model = tiny_model(tok.vocab_size)
    one = evaluate_text(model, tok, TEXT, stride=5, batch_size=1)
    many = evaluate_text(model, tok, TEXT, stride=5, batch_size=7)  # last batch has a short window
    assert one.tokens == many.tokens and abs(one.loss - many.loss) < 1e-5


def test_max_tokens_and_context(tmp_path):
    tok = GPT2Tokenizer()
    model = tiny_model(tok.vocab_size)
    result = evaluate_text(model, tok, TEXT, context=16, stride=16, max_tokens=40, bos=False)
    assert result.context == 16 and result.windows == 3 and result.tokens == 37
    with pytest.raises(ValueError, match="exceeds the model's n_positions"):
        evaluate_text(model, tok, TEXT, context=64)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_eval_tokens(str(tmp_path / "latin1.txt"), tok)


def test_documents_are_separated_by_end_of_text(tmp_path):
    tok = ByteTokenizer()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("second")
    (tmp_path / "d" / "a.md").write_text("first")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00\xff")
    eos = tok.eos_id
    assert load_eval_tokens(str(tmp_path / "d"), tok) == [eos, *b"first", eos, *b"second"]
    assert load_eval_tokens(str(tmp_path / "d"), tok, bos=False, max_tokens=7) == [*b"first", eos, ord("s")]
    # bits per byte count text bytes only: the end-of-text tokens stand for no text
    result = evaluate_ids(tiny_model(tok.vocab_size), load_eval_tokens(str(tmp_path / "d"), tok), tok)
    assert result.tokens == 12 and result.bytes == 11


def test_prepared_dataset_val_split(tmp_path, shakespeare_path):
    from simplegpt.data.prepare import prepare_corpus
    from simplegpt.data.shards import TokenShards

    tok = ByteTokenizer()
    text = shakespeare_path.read_text(encoding="utf-8")[:20000]
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    prepare_corpus(str(tmp_path / "corpus.txt"), tmp_path / "data", tokenizer=tok, val_fraction=0.1, progress=False)
    ids = load_eval_tokens(str(tmp_path / "data"), tok)
    assert ids == list(TokenShards(tmp_path / "data", "val").arrays[0])
    assert tok.decode(ids) in text
    gpt2 = GPT2Tokenizer()
    with pytest.raises(DataError, match="different tokenizer"):
        load_eval_tokens(str(tmp_path / "data"), gpt2)


def test_eval_command_bad_input(tmp_path, capsys):
    tok = ByteTokenizer()
    save_checkpoint(tmp_path / "ck", tiny_model(tok.vocab_size), tok)
    (tmp_path / "t.txt").write_text("hello world")
    cases = [
        (["--checkpoint", str(tmp_path / "nockpt"), "--data", str(tmp_path / "t.txt")], "does not exist"),
        (["--checkpoint", str(tmp_path), "--data", str(tmp_path / "t.txt")], "no config.json"),
        (["--checkpoint", str(tmp_path / "ck"), "--data", str(tmp_path / "none.txt")], "not found"),
        (["--checkpoint", str(tmp_path / "ck"), "--data", str(tmp_path / "t.txt"), "--stride", "64"], "stride"),
    ]
    for args, words in cases:
        assert main(["eval", *args]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
