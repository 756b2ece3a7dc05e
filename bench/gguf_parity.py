"""GGUF parity with llama.cpp itself: export checkpoints with `export-gguf`, run them in
`llama-server`, and compare with simplegpt.

    SIMPLEGPT_LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin PYTHONPATH=. python bench/gguf_parity.py

Two sets of checkpoints:
- random tiny ones (seeded), one per tokenizer (GPT-2 BPE, a trained BPE, byte-level BPEs split as
  Llama 3's and Qwen2's imported tokenizer.json files are, bytes, ASCII characters, characters of
  every script) on GPT-2, and the trained BPE on a Llama-style and a Qwen3-style model;
- trained ones, made in seconds by simplegpt's trainer (trained_checkpoints): a trained BPE on GPT-2
  and on a Llama-style block pretrained on a synthetic corpus, that Llama-style base fine-tuned with
  `train --sft` on synthetic chats (the chat checkpoint), and the quick start's character and byte
  models of the embedded plays.
For each it checks:
- greedy tokens: 64 new tokens from each of 3 prompts, llama-server's /completion at temperature 0
  against simplegpt's greedy decoding, for the f32 file (equal; a random model may part at a near
  tie, see NEAR_TIE) and for the q8_0 file against simplegpt's int8 model (how many tokens agree
  before the first difference; with --no-repack where llama.cpp's repacked q8_0 kernels die of SIGILL);
- tokenization: llama-server's /tokenize of 20 strings (emoji, whitespace runs, code, other
  scripts; for the plays' character model, 20 strings of its characters with em dashes, whitespace
  runs and newlines) against simplegpt's tokenizer.
The chat checkpoint also answers 3 conversations through llama-server's /v1/chat/completions and
`simplegpt serve`'s, both at temperature 0. It prints tables and exits 1 when a check fails.
tests/test_gguf_llamacpp.py runs the same checks with asserts; both skip when the environment
variable does not name a folder holding llama-server. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # gguf_trained, beside this file, also when tests load it by path

from simplegpt.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from simplegpt.generation.engine import generate_ids  # noqa: E402
from simplegpt.gguf_export import export_gguf  # noqa: E402
from simplegpt.gguf_vocab import PRE_TOKENIZERS  # noqa: E402
from simplegpt.hf_tokenizer import HFTokenizer, train_bpe  # noqa: E402
from simplegpt.model import GPT, LLAMA, GPTConfig  # noqa: E402
from simplegpt.quantize import quantize_int8  # noqa: E402
from simplegpt.tokenizer import EOS_TEXT, ByteTokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer  # noqa: E402

from gguf_trained import TRAINED, trained_checkpoints  # noqa: E402

BIN_ENV = "SIMPLEGPT_LLAMA_CPP_BIN"  # the folder of llama.cpp's built binaries (llama-server)
NEW_TOKENS = 64
PROMPTS = ("The king said to the", "def main():\n    x = 1", "Once upon a time, in a land far away,")
STRINGS = (
    "Hello, how are you?",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nthree",
    "     five spaces then text",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "def f(x):\n    return x ** 2  # square\n",
    "Ünïcödé àccents: café, naïve, Zürich",
    "日本語のテキストです。",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "한국어 문장입니다",
    "numbers 1234567890 and 3.14159, 1e-9",
    "it's they're we've I'm you'll he'd",
    "CamelCaseWords and snake_case_words",
    "<html><body class=\"x\">&amp;</body></html>",
    "\u00a0non-breaking\u2003em space\u3000ideographic",
    "mixed 中文 English ελληνικά 123",
    "",
)
# llama.cpp's CPU GELU reads its input and result through an f16 table (ggml's GGML_GELU_FP16), so its f32
# logits differ from PyTorch's in the third decimal: two tokens closer than this are a tie either may win.
NEAR_TIE = 0.02
# The model architectures the parity runs cover: GPT-2 (GGUF's gpt2), a Llama-style block with GQA
# and an untied head (GGUF's llama), and Qwen3's block with QK-norm and heads wider than
# n_embd / n_head (GGUF's qwen3, with attention.key_length).
STYLES = {
    "gpt2": {},
    "llama": dict(LLAMA, n_kv_head=1, tie_word_embeddings=False, rope_theta=50000.0),
    "qwen3": dict(LLAMA, qk_norm=True, n_kv_head=1, head_size=48, rope_theta=1e6, rms_norm_eps=1e-6),
}
# (tokenizer label, style) of each bench row: every tokenizer on GPT-2, the trained BPE on the others
RUNS = (("gpt2", "gpt2"), ("bpe:512", "gpt2"), ("hf-llama-bpe", "gpt2"), ("hf-qwen2", "gpt2"), ("byte", "gpt2"),
        ("char (ASCII)", "gpt2"), ("char (all scripts)", "gpt2"), ("bpe:512", "llama"), ("bpe:512", "qwen3"))
# The prompts and 20 strings of a character model of the quick start's plays: only characters of the
# plays (their one non-ASCII character, the em dash, included), with whitespace runs and newlines.
CHAR_PROMPTS = ("HAMLET:\n", "To be, or not to be—that is the question:\n",
                "KING LEAR:\nO, let me not be mad, not mad, sweet heaven!\n")
CHAR_STRINGS = (
    "HAMLET:\nTo be, or not to be—that is the question.",
    "a — b",
    "——",
    "word—word—word",
    "—leading and trailing—",
    "  two spaces  ",
    "     five spaces then text",
    "\n",
    "\n\n\nthree newlines",
    "line one\nline two\n\nline four\n",
    " \n \n  \n   ",
    "Enter KING, QUEEN, and Attendants.",
    "What's that? 'Tis nothing; go on!",
    "Act 3, Scene 1: 1234567890",
    "O—O—O—O!",
    "Exeunt. Exit GHOST.",
    "&c. & $ -- --- ---- -",
    "UPPER lower MiXeD",
    "x\n—\ny",
    "",
)
# The small ASCII character set of the char-tokenizer model: the prompts' characters and more.
ASCII_CHARS = "".join(chr(c) for c in range(32, 127)) + "\n\t"


def llama_bin() -> Path | None:
    """The folder of llama.cpp's binaries that BIN_ENV names, when it holds llama-server; else None."""
    folder = os.environ.get(BIN_ENV)
    if folder and (Path(folder) / "llama-server").is_file():
        return Path(folder)
    return None


class LlamaCrashed(RuntimeError):
    """llama-server died; `sig` is the signal that killed it (SIGILL for an instruction this CPU lacks), if any."""

    def __init__(self, message: str, sig: int | None) -> None:
        super().__init__(message)
        self.sig = sig


class LlamaServer:
    """llama-server on 127.0.0.1 over one GGUF file, for `with` blocks: tokenize() and complete()."""

    def __init__(self, gguf: Path, bin_dir: Path, n_ctx: int, threads: int = 1, extra: tuple[str, ...] = ()) -> None:
        self.gguf, self.bin_dir, self.n_ctx, self.threads, self.extra = gguf, bin_dir, n_ctx, threads, extra
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()

    def __enter__(self) -> "LlamaServer":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "LD_LIBRARY_PATH": f"{self.bin_dir}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        self.proc = subprocess.Popen(
            [str(self.bin_dir / "llama-server"), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
             "-c", str(self.n_ctx), "-t", str(self.threads), "-np", "1", "--no-webui", *self.extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"llama-server did not become ready in 120 s:\n{self._log_tail()}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def _log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")[-2000:]

    def _check_alive(self) -> None:
        code = self.proc.poll() if self.proc is not None else None
        if code is not None:
            sig = -code if code < 0 else None
            what = f"signal {signal.Signals(sig).name}" if sig else f"exit {code}"
            raise LlamaCrashed(f"llama-server died ({what}) on {self.gguf.name}:\n{self._log_tail()}", sig)

    def post(self, route: str, body: dict) -> dict:
        """The JSON reply of a POST of body (JSON) to route; LlamaCrashed when the server died."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{route}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError) as e:
            self._check_alive()
            raise RuntimeError(f"llama-server {route} failed: {e}") from e

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's token ids of text, special-token text kept as text (as simplegpt encodes it)."""
        return self.post("/tokenize", {"content": text, "add_special": False, "parse_special": False})["tokens"]

    def complete(self, prompt_ids: list[int], n: int) -> list[int]:
        """Greedy (temperature 0) new token ids after prompt_ids; stops early at end of text."""
        reply = self.post("/completion", {"prompt": prompt_ids, "n_predict": n, "temperature": 0.0,
                                           "return_tokens": True, "cache_prompt": False})
        return reply["tokens"]


# On this project's hosts llama.cpp's repacked q8_0 kernels (the CPU_REPACK buffers a native build
# uses on a CPU with AVX-512/AMX) die of SIGILL; with repacking off the plain q8_0 kernels run.
NO_REPACK = ("--no-repack",)


def q8_0_greedy(checkpoint: Path, gguf: Path, bin_dir: Path) -> tuple[list["Greedy"], list["Greedy"], str]:
    """greedy_parity of a q8_0 file against simplegpt's int8 model and against its f32 model, and how
    llama-server ran: by default, or with NO_REPACK after the default died of SIGILL."""
    try:
        with LlamaServer(gguf, bin_dir, n_ctx=256) as server:
            return greedy_parity(checkpoint, server, int8=True), greedy_parity(checkpoint, server), "default"
    except LlamaCrashed as e:
        if e.sig != signal.SIGILL:
            raise
    with LlamaServer(gguf, bin_dir, n_ctx=256, extra=NO_REPACK) as server:
        return (greedy_parity(checkpoint, server, int8=True), greedy_parity(checkpoint, server),
                "--no-repack (the default died of SIGILL)")


def random_checkpoint(path: Path, tokenizer: Tokenizer, seed: int = 0, n_embd: int = 64, n_layer: int = 2,
                      n_head: int = 2, n_positions: int = 256, style: str = "gpt2") -> Path:
    """A random GPT of STYLES[style] saved with `tokenizer`: GPT-2's init scaled by 4 plus noise, so the
    greedy tokens depend on the whole context (an untrained tied model at GPT-2's init mostly repeats
    its last token)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_positions=n_positions, n_embd=n_embd,
                          n_layer=n_layer, n_head=n_head, dropout=0.0, **STYLES[style]))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0).add_(torch.randn_like(p) * 0.05)
    return save_checkpoint(path, model, tokenizer)


def split_bpe(corpus: str, pattern: str, size: int = 512) -> HFTokenizer:
    """A byte-level BPE that splits text by `pattern` before merging, as Llama 3's and Qwen's
    tokenizer.json files do (a Split, then ByteLevel without its own regex): an imported tokenizer."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFT
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFT(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[EOS_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus], trainer=trainer)
    return HFTokenizer(tok.to_str(), eos_id=tok.token_to_id(EOS_TEXT), kind="hf")


def tokenizers() -> dict[str, Tokenizer]:
    """The tokenizers the parity runs cover, by label."""
    corpus = "\n".join(STRINGS + PROMPTS) * 20 + " ".join(f"word{i} {i * 7}" for i in range(2000))
    split = {name: pattern for pattern, name in PRE_TOKENIZERS.items()}
    return {"gpt2": GPT2Tokenizer(), "bpe:512": train_bpe([corpus], 512),
            "hf-llama-bpe": split_bpe(corpus, split["llama-bpe"]), "hf-qwen2": split_bpe(corpus, split["qwen2"]),
            "byte": ByteTokenizer(), "char (ASCII)": CharTokenizer(ASCII_CHARS),
            # every character of STRINGS: emoji, accents and other scripts, as merge chains of their bytes
            "char (all scripts)": CharTokenizer(ASCII_CHARS + "".join(STRINGS))}


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids that end a generation in llama.cpp and in simplegpt's chat: end of text and the
    end-of-turn markers the tokenizer holds (llama.cpp stops at any of them)."""
    from simplegpt.chat.template import END_OF_TURN

    specials = getattr(tokenizer, "special_tokens", None) or {}
    return [tokenizer.eos_id] + [specials[t] for t in END_OF_TURN if t in specials]


def ended(ids: list[int], stops: list[int], n: int) -> list[int]:
    """ids up to and with the first of stops (end of text first), which closes a row shorter than n
    whether or not the generator returned it."""
    cut = next((i for i, t in enumerate(ids) if t in stops), None)
    if cut is not None:
        return ids[: cut + 1]
    return ids + [stops[0]] if len(ids) < n else ids


def agree(a: list[int], b: list[int]) -> int:
    """How many tokens a and b share before their first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@dataclass
class Greedy:
    prompt: str
    ours: list[int]
    llama: list[int]
    # at the first difference: simplegpt's logit of its token minus its logit of llama.cpp's (a near tie
    # when small); None when the tokens are equal
    margin: float | None = None

    @property
    def agree(self) -> int:
        return agree(self.ours, self.llama)

    @property
    def equal(self) -> bool:
        return self.ours == self.llama


def prompts_for(tokenizer: Tokenizer) -> list[tuple[str, list[int]]]:
    """(text, ids) of the 3 prompts of greedy runs: CHATS rendered with the tokenizer's chat template
    (and the assistant's opening, its markers as their ids) where it has one, else PROMPTS, or
    CHAR_PROMPTS for a character vocabulary that lacks some of their characters."""
    from simplegpt.chat import chat_format

    if getattr(tokenizer, "chat_template", None):
        fmt = chat_format(tokenizer)
        # the ids simplegpt serve gives the conversation (its markers as their ids, the contents as text)
        return [(fmt.render(messages, add_generation_prompt=True), fmt.prompt_ids(messages)) for messages in CHATS]
    prompts = PROMPTS
    if isinstance(tokenizer, CharTokenizer) and any(tokenizer.known_text(text)[1] for text in PROMPTS):
        prompts = CHAR_PROMPTS
    return [(text, tokenizer.encode(text)) for text in prompts]


def greedy_parity(checkpoint: Path, server: LlamaServer, int8: bool = False, n: int = NEW_TOKENS) -> list[Greedy]:
    """simplegpt's and llama.cpp's greedy tokens (a row ends at a stop id, see ended) for each of
    prompts_for(its tokenizer); int8: simplegpt's model quantized with quantize_int8 (the reference
    for a q8_0 file)."""
    ck = load_checkpoint(checkpoint)
    model = copy.deepcopy(ck.model)
    if int8:
        quantize_int8(model)
    out = []
    stops = stop_ids(ck.tokenizer)
    for prompt, ids in prompts_for(ck.tokenizer):
        # within the model's context: past it simplegpt slides its window and llama.cpp does not
        k = min(n, ck.model.config.n_positions - len(ids))
        ours = ended(generate_ids(model, ids, k, ck.tokenizer.eos_id), stops, k)
        run = Greedy(prompt, ours, ended(server.complete(ids, k), stops, k))
        i = run.agree
        if not run.equal and i < min(len(run.ours), len(run.llama)):
            with torch.no_grad():
                logits = model(torch.tensor([ids + ours[:i]]))[0][0, -1]  # (V,)
            run.margin = float(logits[ours[i]] - logits[run.llama[i]])
        out.append(run)
    return out


def tokenize_parity(tokenizer: Tokenizer, server: LlamaServer,
                    strings=STRINGS) -> list[tuple[str, list[int], list[int]]]:
    """(string, simplegpt's ids, llama.cpp's ids) for each string that simplegpt can encode."""
    rows = []
    for text in strings:
        _, dropped = tokenizer.known_text(text)
        if dropped:
            continue  # a character vocabulary has no token for it: simplegpt refuses it
        rows.append((text, tokenizer.encode(text), server.tokenize(text)))
    return rows


# A ChatML template (Hugging Face's Jinja convention) for the chat checkpoint, and the conversations
# both servers answer
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATS = (
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "count from 3 to 30"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add 3 and 4"}],
    [{"role": "user", "content": "who has the lamp?"}, {"role": "assistant", "content": "dora has it."},
     {"role": "user", "content": "count from 12 to 40"}],
)
CHAT_TOKENS = NEW_TOKENS


class SimplegptServer:
    """`simplegpt serve` of a checkpoint on 127.0.0.1 (a real process), for `with` blocks: post()."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint

    def __enter__(self) -> "SimplegptServer":
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen([sys.executable, "-m", "simplegpt", "serve", "--checkpoint", str(self.checkpoint),
                                      "--port", "0", "--model-name", "chat"],
                                     stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stderr.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not found:
            self.proc.kill()
            raise RuntimeError(f"simplegpt serve printed no address: {line!r}")
        self.port = int(found.group(1))
        # its access log goes on being read, so that the pipe never fills
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError("simplegpt serve did not answer /health in 60 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def post(self, route: str, body: dict) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{route}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:
            return json.loads(r.read())


def chat_reply(server: "LlamaServer | SimplegptServer", messages: list[dict]) -> str:
    """The assistant's reply to messages from the server's /v1/chat/completions at temperature 0."""
    body = {"model": "chat", "messages": messages, "temperature": 0.0, "max_tokens": CHAT_TOKENS}
    return server.post("/v1/chat/completions", body)["choices"][0]["message"]["content"]


@dataclass
class Chat:
    messages: list[dict]
    ours: str  # simplegpt serve's reply
    llama: str  # llama-server's reply
    # where the replies differ: simplegpt's logit margin at the first token llama.cpp's greedy decoding
    # of the same prompt picks differently (a near tie when small); None when they are equal
    margin: float | None = None

    @property
    def equal(self) -> bool:
        return self.ours == self.llama


def chat_parity(checkpoint: Path, gguf: Path, bin_dir: Path) -> list[Chat]:
    """simplegpt serve's and llama-server's replies to each of CHATS, both at temperature 0."""
    with SimplegptServer(checkpoint) as ours:
        mine = [chat_reply(ours, m) for m in CHATS]
    chats = []
    with LlamaServer(gguf, bin_dir, n_ctx=256) as server:
        for messages, reply in zip(CHATS, mine):
            chat = Chat(messages, reply, chat_reply(server, messages))
            if not chat.equal:  # the same prompt's greedy tokens, to tell a near tie from a difference
                prompt = server.post("/apply-template", {"messages": messages})["prompt"]
                ck = load_checkpoint(checkpoint)
                ids, stops = ck.tokenizer.encode(prompt, specials=True), stop_ids(ck.tokenizer)
                run = Greedy(prompt, ended(generate_ids(ck.model, ids, CHAT_TOKENS, ck.tokenizer.eos_id), stops,
                                           CHAT_TOKENS), ended(server.complete(ids, CHAT_TOKENS), stops, CHAT_TOKENS))
                i = run.agree
                if i < min(len(run.ours), len(run.llama)):
                    with torch.no_grad():
                        logits = ck.model(torch.tensor([ids + run.ours[:i]]))[0][0, -1]
                    chat.margin = float(logits[run.ours[i]] - logits[run.llama[i]])
            chats.append(chat)
    return chats


def _gguf_path(work: Path, ck: Path, qtype: str) -> Path:
    return work / f"{ck.parent.name}-{ck.name}-{qtype}.gguf"


def _row(label: str, ck: Path, tok: Tokenizer, qtype: str, work: Path, bin_dir: Path, strings: tuple[str, ...],
         trained: bool) -> bool:
    """Export ck as qtype, run it in llama-server, print its row of the table; whether it failed: for
    f32, a greedy difference (on a random model: one that is no near tie) or a tokenization difference;
    for q8_0 of a trained model, fewer than half the tokens agreeing with simplegpt's int8."""
    gguf = _gguf_path(work, ck, qtype)
    export_gguf(ck, gguf, type=qtype, progress=False, overwrite=True)
    how, vs_f32, rows = "", [], []
    try:
        if qtype == "q8_0":
            runs, vs_f32, how = q8_0_greedy(ck, gguf, bin_dir)
        else:
            with LlamaServer(gguf, bin_dir, n_ctx=256) as server:
                runs = greedy_parity(ck, server)
                for texts in strings:
                    rows += tokenize_parity(tok, server, texts)
    except LlamaCrashed as e:
        why = f"signal {signal.Signals(e.sig).name}" if e.sig else "an error"
        print(f"{label:<28}{qtype:<7}llama-server died of {why} running this file")
        return qtype == "f32"
    total, same = sum(len(r.ours) for r in runs), sum(r.agree for r in runs)
    greedy = f"{same}/{total} agree" + ("" if all(r.equal for r in runs) else
                                        f" (first differences at {[r.agree for r in runs]})")
    margins = [f"{r.margin:.4f}" for r in runs if r.margin is not None]
    if qtype == "f32":
        failed = any(not r.equal and (trained or (r.margin or 1.0) > NEAR_TIE) for r in runs)
    else:
        failed = trained and 2 * same < total
    tokens = "-"
    if rows:
        equal = sum(ours == theirs for _, ours, theirs in rows)
        tokens = f"{equal}/{len(rows)} equal"
        failed |= equal != len(rows)
        for text, ours, theirs in rows:
            if ours != theirs:
                print(f"    differs: {text!r}: simplegpt {ours} llama.cpp {theirs}")
    print(f"{label:<28}{qtype:<7}{greedy:<52}{tokens}")
    if margins:
        print(f"    simplegpt's logit margin at each first difference: {', '.join(margins)}")
    if vs_f32:
        print(f"    against simplegpt's f32 model instead of int8: {sum(r.agree for r in vs_f32)}/"
              f"{sum(len(r.ours) for r in vs_f32)} agree ({[r.agree for r in vs_f32]})")
    if how and how != "default":
        print(f"    llama-server ran with {how}")
    return failed


def main() -> int:
    bin_dir = llama_bin()
    if bin_dir is None:
        print(f"set {BIN_ENV} to the folder of llama.cpp's built binaries (llama-server)", file=sys.stderr)
        return 2
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True,
                text=True).stdout.splitlines() if line.startswith("Model name")), "unknown CPU")
    print(f"llama.cpp: {bin_dir}\nCPU: {cpu}\n")
    header = f"{'type':<7}{'greedy tokens (3 prompts x 64)':<52}tokenization (20 strings)"
    work = Path(tempfile.mkdtemp(prefix="gguf_parity_"))
    failed = False
    try:
        print(f"{'random (tokenizer, model)':<28}{header}")
        toks = tokenizers()
        for label, style in RUNS:
            ck = random_checkpoint(work / (re.sub(r"\W+", "", label) + f"-{style}"), toks[label], style=style)
            for qtype in ("f32", "q8_0"):
                failed |= _row(f"{label} ({style})", ck, toks[label], qtype, work, bin_dir, (STRINGS,), False)
        print("\n" + "\n".join(f"{label}: {what}" for label, what in TRAINED.items()))
        print(f"{'trained':<28}{header}")
        trained = trained_checkpoints(work / "trained")
        for label, ck in trained.items():
            tok = load_checkpoint(ck).tokenizer
            strings = {"char (plays)": (CHAR_STRINGS,), "byte (plays)": (CHAR_STRINGS, STRINGS)}.get(label, (STRINGS,))
            for qtype in ("f32", "q8_0"):
                failed |= _row(label, ck, tok, qtype, work, bin_dir, strings, True)
        ck = trained["chat (llama, sft)"]
        chats = chat_parity(ck, _gguf_path(work, ck, "f32"), bin_dir)
        failed |= not all(c.equal for c in chats)
        print(f"\nchat (llama, sft): llama-server's /v1/chat/completions equals simplegpt serve's for "
              f"{sum(c.equal for c in chats)}/{len(chats)} conversations at temperature 0 (up to {CHAT_TOKENS} tokens)")
        for c in chats:
            print(f"    {c.messages[-1]['content']!r} -> simplegpt {c.ours!r}" +
                  ("" if c.equal else f", llama.cpp {c.llama!r} (margin {c.margin})"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
