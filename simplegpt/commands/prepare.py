"""simplegpt prepare: tokenize a corpus into token shards + meta.json."""

from __future__ import annotations

import argparse
import json
import signal

from ..console import say
from ..errors import OptionError, file_access_errors

HELP = "tokenize a corpus (files, folder, glob, URL, 'shakespeare', hf:NAME) into a dataset folder"
DESCRIPTION = (HELP + ". The corpus is streamed: batches of documents are tokenized on all cores (worker "
               "processes; the output does not depend on how many) and written, in corpus order, into "
               "uint16/uint32 token shards as they fill, so memory stays bounded whatever the corpus's size. "
               "Documents are separated by EOS; the last --val-fraction (or --val-tokens) of the token stream "
               "is the validation split. Also writes meta.json and the tokenizer. Re-running on unchanged input "
               "does nothing. Counts take suffixes: 10M, 1.5B, 500k.")
def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..data import usable_cores

    p.add_argument("source", nargs="?", default="shakespeare",
                   help="corpus: 'shakespeare' (embedded plays), 'tinyshakespeare' (downloaded once), a .txt/.md/"
                        ".jsonl file, a folder, a quoted glob, an http(s) URL, or hf:NAME[:CONFIG] (a Hugging Face "
                        "dataset, streamed, never downloaded whole, e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT with "
                        "--max-tokens 10M; needs the datasets extra)")
    p.add_argument("-o", "--out", default=None,
                   help="dataset folder to write; default data/<source>_<tokenizer> in the current directory")
    p.add_argument("-t", "--tokenizer", default="char", metavar="{char,byte,gpt2,bpe:N}",
                   help="char: one token per character of the corpus; byte: 256 bytes; gpt2: GPT-2 BPE; bpe:N: "
                        "a byte-level BPE of N tokens (N >= 256, e.g. bpe:8192) trained on this corpus with "
                        "Hugging Face tokenizers, with <|endoftext|>, <|im_start|> and <|im_end|> added on top; "
                        "saved with the dataset and used by every command on its checkpoints")
    p.add_argument("--tokenizer-sample", default=None, metavar="SIZE",
                   help="bpe:N only: train the tokenizer on the corpus's first SIZE bytes of text (e.g. 100MB, "
                        "1.5GB, 500kB) to bound its training time; none: the whole corpus")
    p.add_argument("--max-tokens", default=None, metavar="N",
                   help="stop reading once the token stream holds N tokens (EOS included; the last document "
                        "may be cut), e.g. 10M; none: the whole corpus")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of the token stream (its end) held out for validation")
    p.add_argument("--val-tokens", default=None, metavar="N",
                   help="hold out the last N tokens of the stream for validation instead of --val-fraction "
                        "(e.g. 1M: a fixed-size validation split for a large corpus); none: use --val-fraction")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl lines and HF datasets")
    p.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset to read")
    p.add_argument("--shard-tokens", default="100M", metavar="N", help="tokens per shard file (a count such as 100M)")
    p.add_argument("-j", "--workers", type=int, default=usable_cores(), metavar="N",
                   help="processes that tokenize, in corpus order (the output is the same for any number); "
                        "1 = in this process; the default is the number of cores this process may use")
    p.add_argument("--force", action="store_true", help="prepare again even if the folder is up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it shows tokens and tokens/s)")
    p.add_argument("--json", action="store_true", help="print meta.json instead of a summary")


def _count(args: argparse.Namespace, name: str, minimum: int) -> int | None:
    from ..data import parse_count

    value = getattr(args, name)
    if value is None:
        return None
    option = "--" + name.replace("_", "-")
    try:
        n = parse_count(value)
    except ValueError as e:
        raise OptionError(f"{option}: {e}") from None
    if n < minimum:
        raise OptionError(f"{option} must be at least {minimum}, got {value}")
    return n


# Fewer tokens a shard would only make files by the thousand (10 wrote 20,002 files for 200 kB).
MIN_SHARD_TOKENS = 1_000


def run(args: argparse.Namespace) -> int:
    from ..config import TrainConfig
    from ..data import parse_size, prepare_corpus
    from ..tokenizer import check_tokenizer_name
    from ..training.dataset import dataset_dir

    max_tokens = _count(args, "max_tokens", 2)
    val_tokens = _count(args, "val_tokens", 2)
    shard_tokens = _count(args, "shard_tokens", MIN_SHARD_TOKENS)
    try:
        check_tokenizer_name(args.tokenizer)
    except ValueError as e:
        raise OptionError(f"--tokenizer: {e}") from None
    sample = None
    if args.tokenizer_sample is not None:
        if not args.tokenizer.startswith("bpe:"):
            raise OptionError("--tokenizer-sample applies to a trained tokenizer only (--tokenizer bpe:N)")
        try:
            sample = parse_size(args.tokenizer_sample)
        except ValueError as e:
            raise OptionError(f"--tokenizer-sample: {e}") from None
        if sample < 1:
            raise OptionError(f"--tokenizer-sample must be at least 1 byte, got {args.tokenizer_sample}")
    if max_tokens is not None and val_tokens is not None and val_tokens >= max_tokens:
        raise OptionError(f"--val-tokens ({val_tokens:,}) must be smaller than --max-tokens ({max_tokens:,})")
    if args.workers < 1:
        raise OptionError(f"--workers must be at least 1, got {args.workers}")
    out = args.out or dataset_dir(TrainConfig(data=args.source, tokenizer=args.tokenizer, data_dir=""))

    def terminated(signum, frame):
        # as Ctrl-C does: the worker processes are shut down and the temporary folder removed on the way
        # out (Python's default for SIGTERM ends this process alone and leaves the workers waiting forever)
        say("simplegpt prepare: terminated (SIGTERM)")
        raise SystemExit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, terminated)
    with file_access_errors():
        meta = prepare_corpus(args.source, out, args.tokenizer, val_fraction=args.val_fraction,
                              text_field=args.text_field, hf_split=args.hf_split, shard_tokens=shard_tokens,
                              force=args.force, progress=not args.quiet, max_tokens=max_tokens,
                              val_tokens=val_tokens, workers=args.workers, tokenizer_sample=sample)
    if args.json:
        print(json.dumps(meta, indent=2, ensure_ascii=False))
    else:
        t = meta["tokens"]
        shards = meta["shards"]
        print(f"{out}: {meta['documents']:,} documents, {meta['bytes']:,} bytes -> {t['train']:,} train + "
              f"{t['val']:,} val tokens in {len(shards['train'])} + {len(shards['val'])} shards "
              f"({meta['tokenizer']['type']}, vocab {meta['vocab_size']}, {meta['dtype']})")
    return 0
