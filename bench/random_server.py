"""The server the serving benchmarks measure: a random-weight GPT-2-shaped checkpoint in a temporary
folder, served by a real `simplegpt serve` process on 127.0.0.1 (bench/serve.py, bench/serve_load.py)."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simplegpt import GPT, get_tokenizer, save_checkpoint  # noqa: E402
from simplegpt.model import preset_config  # noqa: E402
from simplegpt.tokenizer import Tokenizer  # noqa: E402


@contextlib.contextmanager
def served_random_model(preset: str, *serve_args: str) -> Iterator[tuple[GPT, Tokenizer, str, str]]:
    """Serve random weights of `preset`'s shape (seed 0, GPT-2 tokenizer) with `simplegpt serve
    --port 0 *serve_args`, named "bench"; yields (the model, its tokenizer, a 16-token prompt, the
    server's /v1 URL) and stops the server at the end. Exits with the server's output when it does
    not start."""
    torch.manual_seed(0)
    tokenizer = get_tokenizer("gpt2")
    model = GPT(preset_config(preset, vocab_size=tokenizer.vocab_size)).eval()
    prompt = tokenizer.decode(list(range(1000, 1016)))
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(Path(tmp) / "bench", model, tokenizer)
        proc = subprocess.Popen([sys.executable, "-m", "simplegpt", "serve", "--checkpoint", str(path), "--port", "0",
                                 *serve_args], stderr=subprocess.PIPE, text=True)
        try:
            found = re.search(r"http://127\.0\.0\.1:(\d+)", proc.stderr.readline())
            if not found:
                sys.exit(f"the server did not start: {proc.stderr.read()}")
            yield model, tokenizer, prompt, f"http://127.0.0.1:{found.group(1)}/v1"
        finally:
            proc.terminate()
            proc.wait(timeout=60)
