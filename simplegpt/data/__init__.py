"""Corpora to token shards, and batches from them: one job per module.

    layout        the names of a dataset folder's files (meta.json, tokenizer/, train_/val_ shards)
                  and the shards' dtype: the one place every reader and writer takes them from
    sources       corpus sources: files, folders, globs, JSONL, URLs, Hugging Face datasets
                  (`resolve_corpus` -> `Corpus`); text_files finds and reads local text files,
                  shakespeare reads the embedded plays
    prepare       `prepare_corpus`: a corpus to a dataset folder, in named steps; it uses
                  vocabulary (the tokenizer made from the corpus: char, bpe:N), encoding (the
                  worker processes that tokenize) and shard_writer (the shard files, the split)
    shards        reading a prepared dataset: `read_meta`, `TokenShards`, `load_dataset_tokenizer`
    samplers      batches for training: `PackedSampler`, `PaddedSampler`

Import each name from its module (`from simplegpt.data.prepare import prepare_corpus`); this file
re-exports nothing. A new kind of corpus source is a function in sources.py.
"""
