"""simplegpt prepare on large corpora: worker processes, token budgets, streaming Hugging Face datasets,
bounded memory, the progress bar and bad input (issue 17)."""

import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from simplegpt.cli import main as cli_main
from simplegpt.data.prepare import parse_count, prepare_corpus
from simplegpt.data.shards import TokenShards, load_dataset_tokenizer, read_meta
from simplegpt.data.sources import Corpus
from simplegpt.errors import DataError
from simplegpt.tokenizer import GPT2Tokenizer, Tokenizer

WORDS = ["the", "king", "crown", "é", "naïve", "über", "café", "日本", "語", "🙂", "  ", "\n", "\n\n", "12", "3.5",
         "<|endoftext|>", "don't", "HAMLET:", "To", "be", ",", "or", "not"]


def _documents(n: int, seed: int = 0, words: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=int(rng.integers(1, words)))) for _ in range(n)]


def _stream(data_dir) -> np.ndarray:
    return np.concatenate([np.asarray(a) for split in ("train", "val") for a in TokenShards(data_dir, split).arrays])


def _tree(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _reference(tok, docs) -> np.ndarray:
    """The token stream prepare must write, from the tokenizer's own encode: each document, then EOS."""
    return np.array([i for d in docs if d for i in (*tok.encode(d), tok.eos_id)], dtype=np.int64)


def _corpus_folder(root, docs):
    (root / "txt").mkdir(parents=True)
    for i, doc in enumerate(docs[:40]):
        (root / "txt" / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    (root / "rows.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[40:]), encoding="utf-8")
    # the folder's order: txt/000.txt ... txt/039.txt sort after rows.jsonl
    return docs[40:] + docs[:40]


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_worker_processes_write_the_same_dataset_as_one_process_byte_for_byte(tmp_path, tokenizer):
    docs = _documents(1500) + [""] + _documents(300, seed=1)  # > 256 documents: several batches
    order = _corpus_folder(tmp_path / "corpus", docs)
    trees = {}
    for workers in (1, 3):
        out = tmp_path / f"ds{workers}"
        meta = prepare_corpus(str(tmp_path / "corpus"), out, tokenizer, shard_tokens=4000, workers=workers,
                              progress=False)
        trees[workers] = _tree(out)
    assert trees[1] == trees[3]
    assert len(meta["shards"]["train"]) > 5 and len(meta["shards"]["val"]) > 1  # the tail split spans shards
    tok = load_dataset_tokenizer(tmp_path / "ds3")
    stream = _stream(tmp_path / "ds3")
    assert np.array_equal(stream, _reference(tok, order))
    assert meta["documents"] == len(docs) - 1  # the empty one is not a document
    assert meta["bytes"] == sum(len(d.encode()) for d in docs)
    assert meta["tokens"]["val"] == int(len(stream) * 0.1) and meta["split"]["method"] == "tail"
    assert all(s["tokens"] <= 4000 for split in meta["shards"].values() for s in split)


class _PidTokenizer(Tokenizer):
    """Bytes as tokens, noting which process encoded each document."""

    kind = "byte-pid"
    vocab_size, eos_id = 257, 256

    def __init__(self, log):
        self.log = log

    def encode(self, text):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return list(text.encode())

    def decode_bytes(self, ids):
        return bytes(i for i in ids if i < 256)


@pytest.mark.parametrize("workers", [1, 2])
def test_documents_are_tokenized_in_worker_processes(tmp_path, workers):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _documents(1200)))
    tok = _PidTokenizer(tmp_path / "pids.log")
    meta = prepare_corpus(str(tmp_path / "rows.jsonl"), tmp_path / "ds", tok, workers=workers, progress=False)
    pids = (tmp_path / "pids.log").read_text().split()
    assert len(pids) == meta["documents"] == 1200
    if workers == 1:
        assert set(pids) == {str(os.getpid())}
    else:
        assert str(os.getpid()) not in pids and 1 <= len(set(pids)) <= 2


def test_a_worker_that_dies_ends_the_run_with_one_line_not_a_hang(tmp_path):
    docs = _documents(1500)
    docs[1000] = "KILL " + docs[1000]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    script = textwrap.dedent(f"""
        import os, signal
        from simplegpt.data.prepare import prepare_corpus
        from simplegpt.errors import SimpleGPTError
        from simplegpt.tokenizer import Tokenizer

        class Killing(Tokenizer):  # bytes as tokens; a worker process that meets KILL is killed
            kind, vocab_size, eos_id = "killing", 257, 256
            parent = os.getpid()

            def encode(self, text):
                if text.startswith("KILL") and os.getpid() != self.parent:
                    os.kill(os.getpid(), signal.SIGKILL)
                return list(text.encode())

        try:
            prepare_corpus({str(tmp_path / "rows.jsonl")!r}, {str(tmp_path / "ds")!r}, Killing(), workers=2,
                           progress=False)
        except SimpleGPTError as e:
            print("error:", e)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("error: a tokenizing worker process died (killed, or out of memory?); "
                                   "run again, with fewer workers if memory is short")
    assert not (tmp_path / "ds").exists()


def test_hf_dataset_streams_through_load_dataset_with_a_budget(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason='the "datasets" extra reads hf: sources')
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    # A local dataset laid out as on the hub: parquet shards under data/, read by the same
    # datasets.load_dataset(..., streaming=True) call that reads hf:HuggingFaceFW/fineweb-edu.
    docs = _documents(900, seed=2)
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for k in range(3):
        part = docs[k * 300:(k + 1) * 300]
        pq.write_table(pa.table({"text": part, "id": list(range(len(part)))}),
                       tmp_path / "hub" / "data" / f"train-{k:05d}-of-00003.parquet")
    calls = []
    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append((a, kw)) or real_load(*a, **kw))

    tok = GPT2Tokenizer()
    full = _reference(tok, docs)
    budget = len(full) // 2 + 7  # ends inside a document
    metas = [prepare_corpus(f"hf:{tmp_path / 'hub'}", tmp_path / f"ds{w}", "gpt2", max_tokens=budget,
                            val_tokens=1000, shard_tokens=3000, workers=w, progress=False) for w in (1, 2)]
    assert calls and all(kw.get("streaming") is True and kw.get("split") == "train" for _, kw in calls)
    assert _tree(tmp_path / "ds1") == _tree(tmp_path / "ds2")
    meta = metas[1]
    stream = _stream(tmp_path / "ds2")
    assert len(stream) == budget and np.array_equal(stream, full[:budget])
    assert meta["tokens"] == {"train": budget - 1000, "val": 1000} and meta["split"]["val_tokens"] == 1000
    assert meta["max_tokens"] == budget and meta["source"] == f"hf:{tmp_path / 'hub'}"
    # the last document is cut: its tokens count as a document and their bytes as text
    assert meta["documents"] == int((stream == tok.eos_id).sum()) + 1
    assert meta["bytes"] == len(tok.decode_bytes(stream[stream != tok.eos_id].tolist()))
    assert meta["val_bytes"] == len(tok.decode_bytes([i for i in stream[-1000:].tolist() if i != tok.eos_id]))


@pytest.mark.parametrize("workers", [1, 2])
def test_max_tokens_stops_reading_an_endless_corpus(tmp_path, workers):
    pulled = []

    def endless():
        for i in itertools.count():
            if i == 20_000:
                raise AssertionError("prepare read far past its token budget")
            pulled.append(i)
            # 'Z' appears only after the budget: the character vocabulary must not hold it
            yield f"document {i}: " + ("abc xyz " * 10) + ("Z" if i > 500 else "")

    corpus = Corpus("endless", endless, {"endless": "1"})
    meta = prepare_corpus(corpus, tmp_path / "ds", "char", max_tokens=20_000, workers=workers, progress=False)
    tok = load_dataset_tokenizer(tmp_path / "ds")
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == 20_000 == len(_stream(tmp_path / "ds"))
    assert "Z" not in tok.chars
    assert len(pulled) < 2 * (20_000 // 90) + 8 * 256  # the budget's documents and a few batches in flight


@pytest.mark.parametrize("workers", [1, 2])
def test_max_tokens_cuts_a_char_document_whose_tail_has_new_characters(tmp_path, workers):
    """The budget ends inside a document whose later characters are not in the budget's vocabulary:
    the document is cut at the budget, not refused for a character it never gets to."""
    (tmp_path / "one.txt").write_text("abc " * 500 + "XYZ!")
    meta = prepare_corpus(str(tmp_path / "one.txt"), tmp_path / "ds", "char", max_tokens=1000, workers=workers,
                          progress=False)
    tok = load_dataset_tokenizer(tmp_path / "ds")
    assert sorted(tok.chars) == [" ", "a", "b", "c"]
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == 1000 and meta["documents"] == 1
    assert tok.decode(_stream(tmp_path / "ds").tolist()) == ("abc " * 250)


def _rss_probe(tmp_path, source, out, workers, tokenizer="byte", shard_tokens="2M") -> dict:
    """Run prepare in a fresh process; return its peak RSS growth during prepare (VmHWM, reset just
    before, minus VmRSS then) and the dataset's meta."""
    script = textwrap.dedent(f"""
        import json, re
        from simplegpt.data.prepare import prepare_corpus, parse_count

        def status(key):
            return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size, to the current one
        before = status("VmRSS")
        meta = prepare_corpus({str(source)!r}, {str(out)!r}, {tokenizer!r}, shard_tokens=parse_count({shard_tokens!r}),
                              workers={workers}, progress=False)
        print(json.dumps({{"growth": status("VmHWM") - before, "meta": meta}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads peak RSS from Linux's /proc")
def test_memory_stays_bounded_on_a_corpus_much_larger_than_a_shard(tmp_path):
    # 24,000 documents of ~2.5 kB: 60 MB of text, 60 M byte tokens = 120 MB as uint16, 30 shards of 2 M
    line = json.dumps({"text": "x" * 2500}) + "\n"
    (tmp_path / "big.jsonl").write_text(line * 24_000)
    result = _rss_probe(tmp_path, tmp_path / "big.jsonl", tmp_path / "ds", workers=2)
    meta = result["meta"]
    token_bytes = (meta["tokens"]["train"] + meta["tokens"]["val"]) * 2
    assert token_bytes > 115e6 and len(meta["shards"]["train"]) + len(meta["shards"]["val"]) >= 30
    print(f"peak RSS growth {result['growth'] / 1e6:.1f} MB for {token_bytes / 1e6:.0f} MB of tokens")
    assert result["growth"] < token_bytes / 4, f"peak RSS grew by {result['growth'] / 1e6:.0f} MB"


def _prepare_cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "simplegpt", "prepare", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes through /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_stopped_prepare_takes_its_worker_processes_with_it(tmp_path, sig):
    """SIGTERM or SIGKILL to the prepare process alone (not its process group): the workers end with it
    (they were left idle forever), and no dataset is left behind; after SIGTERM, no temporary folder
    either (after SIGKILL the next prepare removes it)."""
    import signal
    import time

    rows = tmp_path / "rows.jsonl"
    with rows.open("w") as f:
        subprocess.run([sys.executable, "-c", "import itertools\nfor i in range(400_000): "
                        "print('{\"text\": \"line %d of a long corpus to tokenize\"}' % i)"], stdout=f, check=True)
    proc = subprocess.Popen([sys.executable, "-m", "simplegpt", "prepare", str(rows), "-t", "gpt2", "-o", "ds",
                             "--workers", "2"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    children: list[int] = []
    deadline = time.time() + 60
    while len(children) < 2 and time.time() < deadline and proc.poll() is None:
        children = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        time.sleep(0.05)
    assert len(children) == 2, "the two workers did not start"
    time.sleep(0.3)
    proc.send_signal(getattr(signal, sig))
    assert proc.wait(timeout=30) in (-signal.SIGTERM, 128 + signal.SIGTERM, -signal.SIGKILL)
    deadline = time.time() + 10
    while [c for c in children if Path(f"/proc/{c}").exists()] and time.time() < deadline:
        time.sleep(0.1)
    alive = [c for c in children if Path(f"/proc/{c}").exists()]
    for c in alive:
        os.kill(c, signal.SIGKILL)
    assert not alive, "worker processes outlived the prepare that made them"
    assert not (tmp_path / "ds").exists()
    if sig == "SIGTERM":
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ds")] == []


def _sigterm_is_default() -> bool:
    import signal
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers")
def test_a_tokenizing_worker_ends_at_once_on_sigterm_whatever_its_parent_handles():
    """A forked worker does not keep the parent's Python SIGTERM handler ('simplegpt prepare' exits
    through one): in a worker, that handler's exit waited on the result queue's feeder thread, which
    a SIGKILLed parent's full pipe blocks forever (a worker outlived its killed prepare under load)."""
    import signal
    from concurrent.futures import wait

    from simplegpt.data.encoding import Encoder, EncodingPool

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        with EncodingPool(Encoder(GPT2Tokenizer(), np.dtype(np.uint16)), 2) as pool:
            futures = [pool.pool.submit(_sigterm_is_default) for _ in range(8)]
            wait(futures)
            assert all(f.result() for f in futures)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_cli_shows_tokens_per_second_and_takes_counts_with_suffixes(tmp_path):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _documents(3000)))
    proc = _prepare_cli("rows.jsonl", "-t", "gpt2", "-o", "ds", "--max-tokens", "50k", "--val-tokens", "2k",
                        "--shard-tokens", "10k", "--workers", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"tokenizing rows\.jsonl: 100%.* 50\.0k/50\.0k \[.*, [\d.]+[kM]?tok/s\]", proc.stderr), proc.stderr
    assert "48,000 train + 2,000 val tokens in 5 + 1 shards" in proc.stdout
    meta = read_meta(tmp_path / "ds")
    assert meta["max_tokens"] == 50_000 and [s["tokens"] for s in meta["shards"]["train"]] == [10_000] * 4 + [8_000]


def test_help_explains_the_new_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["prepare", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("--max-tokens N", "--val-tokens N", "--workers N", "the number of cores this process may use",
                   f"(default: {len(os.sched_getaffinity(0))})", "hf:HuggingFaceFW/fineweb", "tokens/s"):
        assert phrase in text, phrase


@pytest.mark.parametrize("args,message", [
    (["empty.txt"], "corpus 'empty.txt' is empty: it holds no text"),
    (["empty.txt", "-t", "gpt2"], "corpus 'empty.txt' is empty: it holds no text to train on"),
    (["ok.txt", "--max-tokens", "0"], "--max-tokens must be at least 2, got 0"),
    (["ok.txt", "--max-tokens", "10X"], "--max-tokens: '10X' is not a count; write e.g. 10M, 1.5B, 500k or 2000000"),
    (["ok.txt", "--max-tokens", "100", "--val-tokens", "100"], "--val-tokens (100) must be smaller than --max-tokens"),
    (["ok.txt", "--val-tokens", "1M"], "val_tokens (1,000,000) must be smaller than the corpus's 1,201 tokens"),
    (["ok.txt", "--workers", "0"], "--workers must be at least 1, got 0"),
    (["ok.txt", "--shard-tokens", "10"], "--shard-tokens must be at least 1000, got 10"),
])
def test_bad_input_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "ok.txt").write_text("hello world\n" * 100)
    workers = [] if "--workers" in args else ["--workers", "2"]
    assert cli_main(["prepare", *args, "-o", "ds", "--quiet", *workers]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simplegpt prepare: error: ") and message in err[0], err
    assert not (tmp_path / "ds").exists()


def test_unknown_hf_dataset_without_the_hub_is_one_line_with_workers(tmp_path):
    pytest.importorskip("datasets", reason='the "datasets" extra reads hf: sources')
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = _prepare_cli("hf:no-such-user/no-such-dataset:sample-10BT", "-t", "gpt2", "--max-tokens", "10M",
                        "--workers", "2", "-o", "out", cwd=tmp_path, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "could not open the Hugging Face dataset 'no-such-user/no-such-dataset:sample-10BT'" in lines[0]
    assert "offline mode is on (HF_HUB_OFFLINE)" in lines[0] and "the network" not in lines[0]  # none is asked for
    assert not (tmp_path / "out").exists()


def test_counts_parse_with_suffixes():
    assert [parse_count(s) for s in ("10M", "1.5B", "500k", "2_000_000", "1e9", "3G", "1T", "7")] == [
        10**7, 15 * 10**8, 500_000, 2_000_000, 10**9, 3 * 10**9, 10**12, 7]
    for bad in ("-1", "1.5", "ten", "10X", ""):
        with pytest.raises(ValueError):
            parse_count(bad)
    with pytest.raises(DataError, match="max_tokens must be at least 2"):
        prepare_corpus("shakespeare", "unused", max_tokens=0, progress=False)


@pytest.mark.parametrize("val_tokens,train_sizes,val_sizes", [
    (300, [100] * 7, [100] * 3),              # the cut on a shard boundary: whole shards renamed
    (250, [100] * 7 + [50], [50, 100, 100]),  # the cut inside a shard: its tail copied, the shard truncated
    (30, [100] * 9 + [70], [30]),
])
def test_the_validation_tail_is_moved_out_of_the_train_shards(tmp_path, val_tokens, train_sizes, val_sizes):
    (tmp_path / "a.txt").write_text("0123456789" * 99 + "012345678")  # 999 bytes + EOS = 1000 tokens
    meta = prepare_corpus(str(tmp_path / "a.txt"), tmp_path / "ds", "byte", shard_tokens=100, val_tokens=val_tokens,
                          workers=1, progress=False)
    assert [s["tokens"] for s in meta["shards"]["train"]] == train_sizes
    assert [s["tokens"] for s in meta["shards"]["val"]] == val_sizes
    assert sorted(p.name for p in (tmp_path / "ds").glob("*.bin")) == sorted(
        s["file"] for split in meta["shards"].values() for s in split)
    expected = np.array([*("0123456789" * 99 + "012345678").encode(), 256])
    assert np.array_equal(_stream(tmp_path / "ds"), expected)
    val = np.concatenate([np.asarray(a) for a in TokenShards(tmp_path / "ds", "val").arrays])
    assert np.array_equal(val, expected[-val_tokens:]) and meta["val_bytes"] == val_tokens - 1


def test_a_new_shard_size_prepares_again_and_the_same_one_does_not(tmp_path):
    """--shard-tokens is part of what makes a dataset up to date: a re-run with another size re-shards,
    a re-run with the same size (or, for a dataset of the default size, none given) does nothing."""
    (tmp_path / "a.txt").write_text("hello world, " * 2000)
    sizes = lambda meta: [s["tokens"] for s in meta["shards"]["train"]]  # noqa: E731
    first = prepare_corpus(str(tmp_path / "a.txt"), tmp_path / "ds", "byte", shard_tokens=5000, progress=False)
    assert sizes(first)[0] == 5000
    again = prepare_corpus(str(tmp_path / "a.txt"), tmp_path / "ds", "byte", shard_tokens=5000, progress=False)
    assert again == first
    other = prepare_corpus(str(tmp_path / "a.txt"), tmp_path / "ds", "byte", shard_tokens=7000, progress=False)
    assert sizes(other)[0] == 7000
    default = prepare_corpus(str(tmp_path / "a.txt"), tmp_path / "ds", "byte", progress=False)
    assert len(sizes(default)) == 1  # one shard of the default size, not the 7,000-token ones
    assert prepare_corpus(str(tmp_path / "a.txt"), tmp_path / "ds", "byte", progress=False) == default


def test_large_text_files_read_in_pieces_give_the_same_dataset_byte_for_byte(tmp_path, monkeypatch):
    """A .txt file is read in pieces (simplegpt.data.text_files.text_pieces): cut between words, or anywhere in
    a stretch with no white space; the shards, vocabulary and counts are those of the file read whole."""
    from simplegpt.data import text_files as corpus_files

    rng = np.random.default_rng(3)
    words = WORDS + ["\r\n", "\t", "x\ry"]
    prose = "".join(words[i] + (" " if j % 3 else "") for j, i in enumerate(rng.integers(0, len(words), 6000)))
    files = {"a.txt": "\ufeff" + prose, "b.txt": "", "c.txt": "ab日本" * 3000, "d.txt": prose.replace("\n", " ")}
    (tmp_path / "c").mkdir()
    for name, text in files.items():
        (tmp_path / "c" / name).write_bytes(text.encode())
    for tokenizer, workers, max_tokens in (("char", 1, None), ("char", 2, 30_000), ("byte", 1, None),
                                           ("gpt2", 2, None)):
        trees = []
        for piece_chars in (10**9, 1000, 4096):
            monkeypatch.setattr(corpus_files, "PIECE_CHARS", piece_chars)
            source = str(tmp_path / "c") if tokenizer != "gpt2" else str(tmp_path / "c" / "[ad].txt")
            out = tmp_path / f"ds-{tokenizer}-{piece_chars}"
            prepare_corpus(source, out, tokenizer, shard_tokens=3000, workers=workers, max_tokens=max_tokens,
                           progress=False)
            trees.append(_tree(out))
        assert trees[1] == trees[0] and trees[2] == trees[0], tokenizer
    assert len(list(corpus_files.text_pieces(tmp_path / "c" / "a.txt"))) > 5  # 4096 characters a piece: read in pieces
    pieces = list(corpus_files.text_pieces(tmp_path / "c" / "a.txt", 1000))
    assert all(isinstance(p, corpus_files.Part) for p in pieces[:-1]) and type(pieces[-1]) is str
    assert "".join(pieces) == prose.replace("\r\n", "\n").replace("\r", "\n")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads peak RSS from Linux's /proc")
def test_memory_stays_bounded_on_a_single_line_file(tmp_path):
    """30 MB of text on one line, with the char tokenizer: read whole, it grew the peak RSS by about
    26 times its size (780 MB); read in pieces, by what a piece and the validation count need."""
    line = " ".join(d.replace("\n", " ") for d in _documents(200))
    (tmp_path / "big.txt").write_text(line * (30_000_000 // len(line.encode())), encoding="utf-8")
    size = (tmp_path / "big.txt").stat().st_size
    result = _rss_probe(tmp_path, tmp_path / "big.txt", tmp_path / "ds", workers=1, tokenizer="char",
                        shard_tokens="100M")
    assert result["meta"]["bytes"] == size and result["meta"]["documents"] == 1
    assert result["growth"] < 250e6, f"peak RSS grew by {result['growth'] / 1e6:.0f} MB for {size / 1e6:.0f} MB"


def test_a_recursive_glob_follows_no_symlink_loop_and_counts_each_file_once(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (root / "a.txt").write_text("first")
    (root / "sub" / "b.txt").write_text("second")
    (tmp_path / "other" / "d.txt").write_text("third")
    (root / "sub" / "up").symlink_to("..")  # loops: back to corpus/, and to sub/ itself
    (root / "sub" / "here").symlink_to(".")
    (root / "again.txt").symlink_to("a.txt")  # the same file by another path
    (root / "other").symlink_to(tmp_path / "other")  # a linked folder outside: followed
    proc = subprocess.run([sys.executable, "-m", "simplegpt", "prepare", f"{root}/**/*.txt", "-o",
                           str(tmp_path / "ds"), "-t", "byte", "-j", "1", "--quiet", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(proc.stdout)
    assert sorted(meta["source_checksums"]) == [str(root / "a.txt"), str(root / "other" / "d.txt"),
                                                str(root / "sub" / "b.txt")]
    assert meta["documents"] == 3
