"""simplegpt prepare: tokenize a corpus into token shards + meta.json."""

from __future__ import annotations

import argparse
import json

from ..errors import file_access_errors

HELP = "tokenize a corpus (files, folder, glob, URL, 'shakespeare', hf:NAME) into a dataset folder"
DESCRIPTION = (HELP + ". Writes uint16/uint32 token shards, meta.json and the tokenizer; documents are "
               "separated by EOS and the last --val-fraction of the tokens is the validation split. "
               "Re-running on unchanged input does nothing.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", default="shakespeare",
                   help="corpus: 'shakespeare' (embedded plays), 'tinyshakespeare' (downloaded once), a .txt/.md/"
                        ".jsonl file, a folder, a quoted glob, an http(s) URL, or hf:NAME[:CONFIG] (needs the "
                        "datasets extra)")
    p.add_argument("-o", "--out", default=None,
                   help="dataset folder to write; default data/<source>_<tokenizer> in the current directory")
    p.add_argument("-t", "--tokenizer", default="char", choices=["char", "byte", "gpt2"],
                   help="char: one token per character of the corpus; byte: 256 bytes; gpt2: GPT-2 BPE")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of the token stream (its end) held out for validation")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl lines and HF datasets")
    p.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset to read")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    p.add_argument("--force", action="store_true", help="prepare again even if the folder is up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print meta.json instead of a summary")


def run(args: argparse.Namespace) -> int:
    from ..config import TrainConfig
    from ..data import prepare_corpus
    from ..train import dataset_dir

    out = args.out or dataset_dir(TrainConfig(data=args.source, tokenizer=args.tokenizer, data_dir=""))
    with file_access_errors():
        meta = prepare_corpus(args.source, out, args.tokenizer, val_fraction=args.val_fraction,
                              text_field=args.text_field, hf_split=args.hf_split, shard_tokens=args.shard_tokens,
                              force=args.force, progress=not args.quiet)
    if args.json:
        print(json.dumps(meta, indent=2, ensure_ascii=False))
    else:
        t = meta["tokens"]
        print(f"{out}: {meta['documents']:,} documents, {meta['bytes']:,} bytes -> {t['train']:,} train + "
              f"{t['val']:,} val tokens ({meta['tokenizer']['type']}, vocab {meta['vocab_size']}, {meta['dtype']})")
    return 0
