"""Tokenizing a corpus: `simplegpt prepare` (GPT-2 BPE) against Hugging Face `datasets.Dataset.map` with
tiktoken's GPT-2 encoding and the same number of processes, on the same text, in one run.

    python bench/prepare.py                          # ../shared/data/tinyshakespeare.txt grown to 50 MB
    python bench/prepare.py --size 4MB --repeats 1   # a quick check that it works
    python bench/prepare.py corpus.txt --size 200MB --workers 8 --doc-bytes 3000

The text (a UTF-8 file, default the tiny Shakespeare file beside the repository) is cut at line ends
into documents of about --doc-bytes bytes and repeated until it reaches --size; the documents are
written as .jsonl files of about 8 MB each into a temporary folder. Both sides read those files:

- simplegpt: `prepare_corpus(folder, tokenizer="gpt2", workers=N)`, timed whole: reading the files,
  their sha256 fingerprint, tokenizing in N worker processes, writing the shards and the validation
  split, fsync. What `simplegpt prepare FOLDER -t gpt2 --workers N --force` does, without the start of
  the Python process.
- the reference: the files loaded with `datasets.load_dataset("json", ...)` into an Arrow cache first
  (not timed), then `Dataset.map(..., num_proc=N)` timed, with nanoGPT's well-known function
  (`enc.encode_ordinary(text)` + the end-of-text token, one row per call) and, as a second
  reference, the batched form (1000 rows per call, `encode_ordinary_batch`, one thread each). Only
  the map is timed: not the load, nor writing the tokens to a file afterwards, as such scripts do.
  The encoding is tiktoken's `Encoding` with GPT-2's ranks and pattern, built from the vocabulary
  simplegpt ships (tiktoken.get_encoding("gpt2") would download the same files), once, before any
  timing: both sides' worker processes are forked with it loaded.

Both must produce the same number of tokens (checked). Each side runs --repeats times, the sides
interleaved; the best time of each counts. Prints tokens/s for each and the ratios simplegpt/reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simplegpt.data.encoding import usable_cores  # noqa: E402
from simplegpt.data.prepare import parse_count, prepare_corpus  # noqa: E402
from simplegpt.tokenizer import _gpt2_encoding  # noqa: E402

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
FILE_BYTES = 8 << 20


def parse_size(text: str) -> int:
    """'50MB', '4M', '500kB', '1GB' -> bytes (powers of 1000, as the counts of simplegpt prepare)."""
    t = text.strip()
    return parse_count(t[:-1] if t[-1:].lower() == "b" and len(t) > 1 and t[-2:-1].isalpha() else t)


def make_documents(text: str, size: int, doc_bytes: int) -> list[str]:
    """Documents of about doc_bytes UTF-8 bytes, cut at line ends, cycling over the text until `size` bytes."""
    lines = text.splitlines(keepends=True)
    docs: list[str] = []
    total, piece, piece_bytes = 0, [], 0
    while total < size:
        for line in lines:
            piece.append(line)
            piece_bytes += len(line.encode("utf-8"))
            if piece_bytes >= doc_bytes:
                docs.append("".join(piece))
                total += piece_bytes
                piece, piece_bytes = [], 0
                if total >= size:
                    break
    return docs


def write_jsonl(docs: list[str], folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    files: list[Path] = []
    out, written = None, FILE_BYTES
    for doc in docs:
        if written >= FILE_BYTES:
            if out:
                out.close()
            files.append(folder / f"part-{len(files):05d}.jsonl")
            out, written = open(files[-1], "w", encoding="utf-8"), 0
        line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
        out.write(line)
        written += len(line)
    if out:
        out.close()
    return files


# The reference's functions: module-level, as in the scripts that use this recipe.
ENC = None


def _enc():
    global ENC
    if ENC is None:
        ENC = _gpt2_encoding()
    return ENC


def tokenize_row(example):  # nanoGPT's prepare.py: one row per call
    enc = _enc()
    ids = enc.encode_ordinary(example["text"])
    ids.append(enc.eot_token)
    return {"ids": ids, "len": len(ids)}


def tokenize_batch(batch):  # the batched form: 1000 rows per call
    enc = _enc()
    ids = [row + [enc.eot_token] for row in enc.encode_ordinary_batch(batch["text"], num_threads=1)]
    return {"ids": ids, "len": [len(r) for r in ids]}


def run_simplegpt(folder: Path, out: Path, workers: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    meta = prepare_corpus(str(folder), out, "gpt2", workers=workers, force=True, progress=False)
    elapsed = time.perf_counter() - t0
    return elapsed, meta["tokens"]["train"] + meta["tokens"]["val"]


def run_map(ds, workers: int, batched: bool) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = ds.map(tokenize_batch if batched else tokenize_row, batched=batched, batch_size=1000,
                 num_proc=workers if workers > 1 else None, remove_columns=["text"], load_from_cache_file=False,
                 desc=None)
    elapsed = time.perf_counter() - t0
    return elapsed, int(sum(out["len"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("text", nargs="?", default=str(DEFAULT_TEXT), help="UTF-8 text file to grow the corpus from")
    ap.add_argument("--size", default="50MB", help="corpus size in bytes (e.g. 50MB, 4MB)")
    ap.add_argument("--doc-bytes", type=int, default=4000, help="about this many bytes per document")
    ap.add_argument("--workers", type=int, default=usable_cores(),
                    help="processes for both sides (simplegpt's workers, map's num_proc)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side, interleaved; the best counts")
    args = ap.parse_args()

    import datasets

    print("command: python bench/prepare.py " + " ".join(sys.argv[1:]), flush=True)

    datasets.disable_progress_bars()
    _enc()  # GPT-2's ranks are read once here, before any timing: both sides' processes inherit them
    text = Path(args.text).read_text(encoding="utf-8")
    size = parse_size(args.size)
    docs = make_documents(text, size, args.doc_bytes)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        files = write_jsonl(docs, tmp / "corpus")
        del docs
        ds = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train",
                                   cache_dir=str(tmp / "hf-cache"))
        print(f"text: {n_bytes / 1e6:.1f} MB in {len(ds):,} documents of ~{args.doc_bytes} bytes "
              f"({Path(args.text).name} repeated), {len(files)} .jsonl files; {args.workers} processes each side; "
              f"GPT-2 BPE; {os.cpu_count()} CPUs, {usable_cores()} usable")
        sides = {"simplegpt prepare": lambda: run_simplegpt(tmp / "corpus", tmp / "ds", args.workers),
                 "datasets.map, per row (nanoGPT)": lambda: run_map(ds, args.workers, batched=False),
                 "datasets.map, batched 1000": lambda: run_map(ds, args.workers, batched=True)}
        best: dict[str, float] = {}
        tokens: dict[str, int] = {}
        for r in range(args.repeats):
            for name, run in sides.items():
                elapsed, n = run()
                best[name] = min(best.get(name, float("inf")), elapsed)
                tokens[name] = n
                print(f"  round {r + 1}: {name:32s} {elapsed:7.2f} s", flush=True)
    if len(set(tokens.values())) != 1:
        print(f"token counts differ: {tokens}")
        return 1
    n = next(iter(tokens.values()))
    print(f"tokens: {n:,} (same on every side)")
    for name, seconds in best.items():
        print(f"{name:32s} {seconds:7.2f} s  {n / seconds / 1e6:7.3f} M tokens/s  {n_bytes / seconds / 1e6:7.2f} MB/s")
    ours = best["simplegpt prepare"]
    for name, seconds in best.items():
        if name != "simplegpt prepare":
            print(f"ratio simplegpt / {name}: {seconds / ours:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
