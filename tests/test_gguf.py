"""export-gguf without llama.cpp: what the file holds (read back with the `gguf` package's reader),
transformers loading it, and the one-line refusals that leave nothing at OUT.

llama.cpp itself runs the files in tests/test_gguf_llamacpp.py (when its binaries are found)."""

import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, make_tiny_gpt, with_template
from simplegpt.cli import main
from simplegpt.checkpoint import load_checkpoint, save_checkpoint
from simplegpt.errors import CheckpointError, OptionError
from simplegpt.gguf_export import architecture_for, export_gguf, write_gguf
from simplegpt.hf_tokenizer import _byte_decoder, train_bpe
from simplegpt.model import GPT, GPTConfig
from simplegpt.tokenizer import ByteTokenizer, CharTokenizer, GPT2Tokenizer, gpt2_vocab_files

gguf = pytest.importorskip("gguf")

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
# simplegpt state-dict name -> GGUF gpt2 name, written out here so the test does not use the exporter's map
GPT2_NAMES = {
    "transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
    "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
    **{f"transformer.h.{i}.{ours}.{kind}": f"blk.{i}.{theirs}.{kind}" for i in range(2) for kind in ("weight", "bias")
       for ours, theirs in [("ln_1", "attn_norm"), ("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"),
                            ("ln_2", "ffn_norm"), ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")]},
}


def _checkpoint(path: Path, tokenizer, metadata=None, **overrides) -> Path:
    model = make_tiny_gpt(vocab_size=tokenizer.vocab_size, jitter=0.05, **overrides)
    return save_checkpoint(path, model, tokenizer, metadata=metadata)


def _fields(path: Path) -> dict:
    """Every metadata key of a GGUF file and its value (arrays as lists), without the reader's header fields."""
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _bench_parity():
    """bench/gguf_parity.py as a module (its imported-tokenizer maker)."""
    spec = importlib.util.spec_from_file_location("gguf_parity", ROOT / "bench" / "gguf_parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gguf_parity"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class Ran:
    """What one in-process `simplegpt` command line gave: its exit code and stderr."""

    def __init__(self, capsys, *args) -> None:
        capsys.readouterr()
        try:
            self.returncode = main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            self.returncode = e.code
        self.stderr = capsys.readouterr().err


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_the_reader_gets_back_every_tensor_and_key_as_written(tmp_path, qtype):
    ck = _checkpoint(tmp_path / "ck", with_template(ByteTokenizer(), TEMPLATE))
    out = export_gguf(ck, tmp_path / "m.gguf", type=qtype).path
    alphabet = {b: c for c, b in _byte_decoder().items()}
    assert _fields(out) == {
        "general.architecture": "gpt2", "general.name": "ck",
        "gpt2.context_length": 32, "gpt2.embedding_length": 32, "gpt2.feed_forward_length": 128,
        "gpt2.block_count": 2, "gpt2.attention.head_count": 2,
        "gpt2.attention.layer_norm_epsilon": pytest.approx(1e-5),
        "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7}[qtype],
        **({"general.quantization_version": gguf.GGML_QUANT_VERSION} if qtype == "q8_0" else {}),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        # each byte's token is its byte-level character (space -> 'Ġ', newline -> 'Ċ'), then end-of-text
        "tokenizer.ggml.tokens": [alphabet[b] for b in range(256)] + ["<|endoftext|>"],
        "tokenizer.ggml.token_type": [1] * 256 + [3],  # normal, then a control token
        # the merges key llama.cpp requires, holding one merge of two control tokens: never a BPE pair
        "tokenizer.ggml.merges": ["<|endoftext|> <|endoftext|>"],
        "tokenizer.ggml.bos_token_id": 256, "tokenizer.ggml.eos_token_id": 256,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": TEMPLATE,
    }
    state = load_checkpoint(ck).model.state_dict()
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert sorted(tensors) == sorted(GPT2_NAMES.values())  # the head is tied: no output.weight
    for ours, name in GPT2_NAMES.items():
        want = state[ours].numpy()
        t = tensors[name]
        assert tuple(t.shape) == tuple(reversed(want.shape))  # GGUF lists dimensions innermost first
        if qtype == "f32" or want.ndim == 1 or name == "position_embd.weight":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(t.data, want), name
        elif qtype == "f16":
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            assert np.array_equal(t.data, want.astype(np.float16)), name
        else:  # the format's own Q8_0 blocks: 32 values per block, one f16 scale each
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            assert np.array_equal(t.data, gguf.quants.quantize(want, gguf.GGMLQuantizationType.Q8_0)), name
            back = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType.Q8_0)
            assert np.abs(back - want).max() <= np.abs(want).max() / 127 + 1e-6


def test_gpt2_bpe_is_written_with_its_vocabulary_and_merges_and_no_template_when_none_is_stored(tmp_path):
    out = export_gguf(_checkpoint(tmp_path / "ck", GPT2Tokenizer()), tmp_path / "m.gguf").path
    fields = _fields(out)
    encoder, bpe = gpt2_vocab_files()
    ids = json.loads(encoder.read_text(encoding="utf-8"))
    assert fields["tokenizer.ggml.tokens"] == sorted(ids, key=ids.__getitem__)
    assert fields["tokenizer.ggml.token_type"] == [1] * 50256 + [3]  # <|endoftext|> is a control token
    assert fields["tokenizer.ggml.merges"] == bpe.read_text(encoding="utf-8").splitlines()[1:50001]
    assert (fields["tokenizer.ggml.pre"], fields["tokenizer.ggml.eos_token_id"]) == ("gpt-2", 50256)
    assert "tokenizer.chat_template" not in fields


def test_a_trained_bpe_is_written_with_its_merges_and_special_tokens(tmp_path):
    tok = train_bpe(["hello world, the words of the world " * 50], 300)
    out = export_gguf(_checkpoint(tmp_path / "ck", tok), tmp_path / "m.gguf").path
    fields = _fields(out)
    doc = json.loads(tok.json)
    vocab = doc["model"]["vocab"]
    added = {t["content"]: t["id"] for t in doc["added_tokens"]}
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == tok.vocab_size and all(tokens[i] == t for t, i in {**vocab, **added}.items())
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    assert fields["tokenizer.ggml.merges"]  # the corpus gave merges to write
    assert [fields["tokenizer.ggml.token_type"][i] for i in added.values()] == [3, 3, 3]
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_id == 0


def test_an_ascii_char_vocabulary_is_one_byte_tokens_with_no_merge_that_applies(tmp_path):
    tok = CharTokenizer("\n !',.?abcdefghijklmnopqrstuvwxyzT")
    fields = _fields(export_gguf(_checkpoint(tmp_path / "ck", tok), tmp_path / "m.gguf").path)
    alphabet = {b: c for c, b in _byte_decoder().items()}
    assert fields["tokenizer.ggml.tokens"] == [alphabet[ord(c)] for c in tok.chars] + ["<|endoftext|>"]
    assert fields["tokenizer.ggml.token_type"] == [1] * len(tok.chars) + [3]
    assert fields["tokenizer.ggml.merges"] == ["<|endoftext|> <|endoftext|>"]


def test_a_char_vocabulary_with_multi_byte_characters_gets_one_merge_chain_per_character(tmp_path):
    """Each character is one token, its UTF-8 bytes in the byte-level alphabet; a character of n bytes
    gets the n - 1 merges that join its bytes left to right (llama.cpp needs no token for the
    intermediates), shared prefixes once. It used to be refused ("non-ASCII character(s)")."""
    tok = CharTokenizer("\n abé—’🙂")
    fields = _fields(export_gguf(_checkpoint(tmp_path / "ck", tok), tmp_path / "m.gguf").path)
    alphabet = {b: c for c, b in _byte_decoder().items()}

    def spelled(data: bytes) -> str:
        return "".join(alphabet[b] for b in data)

    assert fields["tokenizer.ggml.tokens"] == [spelled(c.encode()) for c in tok.chars] + ["<|endoftext|>"]
    assert fields["tokenizer.ggml.token_type"] == [1] * len(tok.chars) + [3]
    # é = C3 A9; — = E2 80 94 and ’ = E2 80 99 share E2 80; 🙂 = F0 9F 99 82
    chains = [b"\xc3\xa9", b"\xe2\x80\x94", b"\xe2\x80\x99", b"\xf0\x9f\x99\x82"]
    want = []
    for data in chains:
        for i in range(1, len(data)):
            merge = f"{spelled(data[:i])} {spelled(data[i:i + 1])}"
            want += [merge] if merge not in want else []
    assert sorted(fields["tokenizer.ggml.merges"]) == sorted(want) and len(want) == 1 + 2 + 1 + 3


def test_an_imported_tokenizer_json_gets_llama_cpps_name_for_its_split_or_is_refused(tmp_path):
    parity = _bench_parity()
    corpus = "Hello there, general Kenobi. 12345 numbers and  spaces\n" * 30
    for name, pattern in [("llama-bpe", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                                        r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                          ("qwen2", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                                    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")]:
        tok = parity.split_bpe(corpus, pattern, size=300)
        fields = _fields(export_gguf(_checkpoint(tmp_path / name, tok), tmp_path / f"{name}.gguf").path)
        assert fields["tokenizer.ggml.pre"] == name
    tok = parity.split_bpe(corpus, r"\p{N}+|[^\p{N}]+", size=300)  # a split llama.cpp has no name for
    with pytest.raises(CheckpointError, match="splits text with a pre-tokenizer llama.cpp has no name for here"):
        export_gguf(_checkpoint(tmp_path / "other", tok), tmp_path / "other.gguf")
    assert not (tmp_path / "other.gguf").exists()


@pytest.mark.parametrize("n_positions", [1024, 64])
def test_transformers_loads_the_file_with_logits_within_1e_4(tmp_path, n_positions):
    """transformers (5.x) maps GGUF's gpt2.context_length to `n_ctx`, which GPT2Config does not size
    the position table by: a file whose context is not 1024 loads only with n_positions= given (else
    'ignore_mismatched_sizes'); docs/export.md says so."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    tok = train_bpe(["Hello, how are you? The king said: emoji 🙂 and 日本語, tabs\tand  spaces. " * 40], 400)
    ck = _checkpoint(tmp_path / "ck", tok, n_positions=n_positions, scale=4.0)
    export_gguf(ck, tmp_path / "m.gguf")
    extra = {} if n_positions == 1024 else {"n_positions": n_positions}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32, **extra)
    model = load_checkpoint(ck).model
    ids = torch.tensor([tok.encode("Hello, how are you? The king said")])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ["Hello, how are you?", "emoji 🙂  two spaces\n\ttab", "日本語 and код"]:
        assert hf_tok(text)["input_ids"] == tok.encode(text)


def test_progress_bars_show_when_asked(tmp_path, capsys):
    export_gguf(_checkpoint(tmp_path / "ck", ByteTokenizer()), tmp_path / "m.gguf", progress=True)
    err = capsys.readouterr().err
    assert "converting" in err and "Writing" in err


# --- bad input: one line, nothing at OUT -----------------------------------------------------------------------


def _one_line(proc: Ran, code: int = 1) -> str:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr.strip()


def _nothing_but(folder: Path, *names: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no hidden temporary file either


def test_a_config_option_gguf_cannot_express_is_refused_naming_it(tmp_path):
    """An architecture option on the model's config (as the Llama-style ones will be) that no GGUF
    architecture of the exporter carries is refused before anything is written."""

    @dataclasses.dataclass
    class WithNorm(GPTConfig):
        norm: str = "layernorm"

    model = GPT(WithNorm(vocab_size=257, n_positions=32, n_embd=32, n_layer=1, n_head=2, norm="rmsnorm"))
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match=r"GGUF cannot express this model: gpt2 has no norm='rmsnorm'"):
        write_gguf(model, ByteTokenizer(), tmp_path / "out" / "m.gguf")
    _nothing_but(tmp_path / "out")
    # the same option at GPT-2's value is GPT-2
    model = GPT(WithNorm(vocab_size=257, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    assert write_gguf(model, ByteTokenizer(), tmp_path / "out" / "m.gguf").architecture == "gpt2"


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    narrow = _checkpoint(tmp_path / "narrow", ByteTokenizer(), n_embd=48, n_head=2)
    line = _one_line(Ran(capsys, "export-gguf", narrow, out / "m.gguf", "--type", "q8_0"))
    assert line == ("simplegpt export-gguf: error: --type q8_0 stores rows in blocks of 32 values and this model's "
                    "token_embd.weight has rows of 48, not a multiple of 32; use --type f16 or f32")
    bad_type = Ran(capsys, "export-gguf", narrow, out / "m.gguf", "--type", "q4_0")
    assert "invalid choice: 'q4_0'" in _one_line(bad_type, 2)
    unk = _checkpoint(tmp_path / "unk", CharTokenizer("abc\n ", unk=" "))
    assert "llama.cpp drops them instead" in _one_line(Ran(capsys, "export-gguf", unk, out / "m.gguf"))
    _nothing_but(out)
    (out / "m.gguf").write_bytes(b"keep me")
    line = _one_line(Ran(capsys, "export-gguf", narrow, out / "m.gguf"))
    assert line == (f"simplegpt export-gguf: error: {out / 'm.gguf'} already exists; choose a new file or pass "
                    "--overwrite")
    assert (out / "m.gguf").read_bytes() == b"keep me"
    (tmp_path / "a-file").write_text("x")
    line = _one_line(Ran(capsys, "export-gguf", narrow, tmp_path / "a-file" / "m.gguf"))
    assert line.startswith(f"simplegpt export-gguf: error: {tmp_path / 'a-file' / 'm.gguf'}: cannot be written (")
    assert Ran(capsys, "export-gguf", narrow, out / "m.gguf", "--overwrite").returncode == 0
    _nothing_but(out, "m.gguf")


def test_without_the_gguf_package_it_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    ck = _checkpoint(tmp_path / "ck", ByteTokenizer())
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` meets when the extra is not installed
    proc = Ran(capsys, "export-gguf", ck, tmp_path / "m.gguf")
    assert _one_line(proc) == ("simplegpt export-gguf: error: export-gguf needs the gguf package, which is not "
                               'installed; install the GGUF extra: pip install "simplegpt-toolkit[gguf]"')
    _nothing_but(tmp_path, "ck")


def _options(arch: str) -> dict:
    """The model options of a checkpoint written as GGUF's `arch` (STYLES, below, for llama and qwen3)."""
    return {} if arch == "gpt2" else STYLES[arch]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_a_full_disk_is_one_line_and_keeps_the_file_that_was_there(tmp_path, small_disk, capsys, arch):
    disk = small_disk("2m")
    # 50257 x 32 embeddings: 6.4 MB of f32, 1.8 MB of q8_0
    ck = _checkpoint(tmp_path / "ck", GPT2Tokenizer(), **_options(arch))
    assert architecture_for(load_checkpoint(ck).model.config).name == arch
    (disk / "m.gguf").write_bytes(b"the previous export")
    line = _one_line(Ran(capsys, "export-gguf", ck, disk / "m.gguf", "--overwrite"))
    assert line == (f"simplegpt export-gguf: error: the disk of {disk / 'm.gguf'} is full (No space left on device); "
                    "nothing was written: free some space and export again")
    assert (disk / "m.gguf").read_bytes() == b"the previous export"
    _nothing_but(disk, "m.gguf")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_an_unwritable_destination_is_one_line(tmp_path, small_disk, capsys, arch):
    """A read-only disk, a folder without write permission (for a user that permissions bind), and a
    path under a file: one line each, nothing left at OUT."""
    disk = small_disk("1m", ro=True)
    ck = _checkpoint(tmp_path / "ck", ByteTokenizer(), **_options(arch))
    line = _one_line(Ran(capsys, "export-gguf", ck, disk / "m.gguf"))
    assert line == f"simplegpt export-gguf: error: {disk / 'm.gguf'}: cannot be written (Read-only file system)"
    _nothing_but(disk)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # root writes anywhere: the read-only disk above stands for it
        line = _one_line(Ran(capsys, "export-gguf", ck, locked / "m.gguf"))
        assert line == f"simplegpt export-gguf: error: {locked / 'm.gguf'}: cannot be written (Permission denied)"
    _nothing_but(locked)
    (tmp_path / "a-file").write_text("x")
    line = _one_line(Ran(capsys, "export-gguf", ck, tmp_path / "a-file" / "m.gguf"))
    assert line.startswith(f"simplegpt export-gguf: error: {tmp_path / 'a-file' / 'm.gguf'}: cannot be written (")
    assert (tmp_path / "a-file").read_text() == "x"


def test_write_gguf_refuses_a_bad_type_before_anything(tmp_path):
    with pytest.raises(OptionError, match="choose one of f32, f16, q8_0"):
        write_gguf(make_tiny_gpt(vocab_size=257), ByteTokenizer(), tmp_path / "m.gguf", type="q4_k")
    _nothing_but(tmp_path)


# --- Llama-style checkpoints: GGUF's llama and qwen3 -------------------------------------------------------------

LLAMA_STYLE = dict(positions="rotary", norm="rmsnorm", mlp="swiglu", bias=False, rms_norm_eps=1e-5)
STYLES = {
    # GQA, an untied head, biases, a head width of its own (key_length), no norm gains (written as ones)
    "llama": dict(LLAMA_STYLE, n_kv_head=1, tie_word_embeddings=False, bias=True, head_size=24, norm_gain=False,
                  intermediate_size=96, rope_theta=50000.0),
    "qwen3": dict(LLAMA_STYLE, qk_norm=True, n_kv_head=1, rope_theta=1e6, rms_norm_eps=1e-6),
}


@pytest.mark.parametrize("style", ["llama", "qwen3"])
def test_llama_style_files_hold_their_hyperparameters_and_tensors_in_ggufs_layout(tmp_path, style):
    tok = with_template(train_bpe(["hello world, the words of the world " * 50], 300), TEMPLATE)
    ck = _checkpoint(tmp_path / "ck", tok, **STYLES[style])
    out = export_gguf(ck, tmp_path / "m.gguf").path
    model = load_checkpoint(ck).model
    c = model.config
    fields = _fields(out)
    hparams = {k.split(".", 1)[1]: v for k, v in fields.items() if k.startswith(f"{style}.")}
    assert fields["general.architecture"] == style and fields["tokenizer.chat_template"] == TEMPLATE
    assert hparams == {
        "vocab_size": tok.vocab_size, "context_length": 32, "embedding_length": 32, "block_count": 2,
        "feed_forward_length": c.ffn_size, "attention.head_count": 2, "attention.head_count_kv": 1,
        "rope.dimension_count": c.head_dim, "rope.freq_base": c.rope_theta,
        "attention.layer_norm_rms_epsilon": pytest.approx(c.rms_norm_eps),
        **({"attention.key_length": 24, "attention.value_length": 24} if style == "llama" else {}),
    }
    tensors = {t.name: t.data for t in gguf.GGUFReader(out).tensors}
    state = model.state_dict()
    H, K, D, F = 2, 1, c.head_dim, c.ffn_size
    for i in range(2):
        q, k, v = state[f"transformer.h.{i}.attn.c_attn.weight"].split([H * D, K * D, K * D])
        if style == "llama":  # each head's rows i and i + D/2 (rotated together) become rows 2i and 2i+1
            order = torch.tensor([h * D + r + half * D // 2
                                  for h in range(H) for r in range(D // 2) for half in (0, 1)])
            assert np.array_equal(tensors[f"blk.{i}.attn_q.weight"], q[order].numpy())
            assert np.array_equal(tensors[f"blk.{i}.attn_k.weight"], k[order[: K * D]].numpy())
            q_bias = state[f"transformer.h.{i}.attn.c_attn.bias"][: H * D]
            assert np.array_equal(tensors[f"blk.{i}.attn_q.bias"], q_bias[order].numpy())
            assert np.array_equal(tensors[f"blk.{i}.attn_norm.weight"], np.ones(32, np.float32))  # no gain
        else:  # qwen3 rotates halves, as simplegpt does: nothing moves
            assert np.array_equal(tensors[f"blk.{i}.attn_q.weight"], q.numpy())
            assert np.array_equal(tensors[f"blk.{i}.attn_k.weight"], k.numpy())
            q_norm = state[f"transformer.h.{i}.attn.q_norm.weight"]
            assert np.array_equal(tensors[f"blk.{i}.attn_q_norm.weight"], q_norm)
        assert np.array_equal(tensors[f"blk.{i}.attn_v.weight"], v.numpy())
        gate, up = state[f"transformer.h.{i}.mlp.c_fc.weight"].split([F, F])
        assert np.array_equal(tensors[f"blk.{i}.ffn_gate.weight"], gate.numpy())
        assert np.array_equal(tensors[f"blk.{i}.ffn_up.weight"], up.numpy())
    # the untied head is written as output.weight; a tied one is token_embd alone
    assert ("output.weight" in tensors) == (style == "llama")
    if style == "llama":
        assert np.array_equal(tensors["output.weight"], state["lm_head.weight"].numpy())


@pytest.mark.parametrize("style", ["llama", "qwen3"])
def test_transformers_loads_llama_style_files_with_logits_within_1e_4(tmp_path, style):
    """Two gaps in transformers' (5.x) GGUF reader, which docs/export.md names: it reads no
    attention.key_length for qwen3 (its key map for qwen3 lacks it; qwen3_moe's has it) and
    Qwen3Config's head_dim defaults to 128, so a qwen3 file whose heads are not 128 wide loads only
    with head_dim= given (else 'ignore_mismatched_sizes'); and GGUF has no key saying a llama has
    biases, so transformers drops them unless attention_bias=True, mlp_bias=True are given."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    tok = train_bpe(["Hello, how are you? The king said: emoji 🙂 and 日本語, tabs\tand  spaces. " * 40], 400)
    options = dict(STYLES[style], head_size=None, norm_gain=True) if style == "llama" else STYLES[style]
    ck = _checkpoint(tmp_path / "ck", tok, n_positions=64, scale=4.0, **options)
    export_gguf(ck, tmp_path / "m.gguf")
    model = load_checkpoint(ck).model
    extra = {"head_dim": model.config.head_dim} if style == "qwen3" else {"attention_bias": True, "mlp_bias": True}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32, **extra)
    ids = torch.tensor([tok.encode("Hello, how are you? The king said")])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max() < 1e-4


@pytest.mark.parametrize("options, named", [
    (dict(LLAMA_STYLE, mlp="relu2"), "llama has no mlp='relu2'"),
    (dict(norm="rmsnorm"), "llama has no positions='learned'"),
    (dict(positions="rotary"), "llama has no norm='layernorm'"),
    (dict(LLAMA_STYLE, qk_norm=True, bias=True), "qwen3 has no bias=True"),
])
def test_a_llama_style_option_gguf_cannot_express_is_one_line_naming_it(tmp_path, capsys, options, named):
    ck = _checkpoint(tmp_path / "ck", ByteTokenizer(), **options)
    (tmp_path / "out").mkdir()
    line = _one_line(Ran(capsys, "export-gguf", ck, tmp_path / "out" / "m.gguf"))
    assert line.startswith("simplegpt export-gguf: error: GGUF cannot express this model: gpt2 has no ")
    assert named in line
    _nothing_but(tmp_path / "out")


def test_an_embedding_padded_past_its_tokenizer_gets_unused_tokens(tmp_path):
    tok = train_bpe(["hello world, the words of the world " * 50], 300)
    model = make_tiny_gpt(vocab_size=tok.vocab_size + 20, **STYLES["qwen3"])
    ck = save_checkpoint(tmp_path / "ck", model, tok)
    fields = _fields(export_gguf(ck, tmp_path / "m.gguf").path)
    assert fields["tokenizer.ggml.tokens"][tok.vocab_size:] == [f"[PAD{i}]" for i in range(tok.vocab_size,
                                                                                          tok.vocab_size + 20)]
    assert fields["tokenizer.ggml.token_type"][tok.vocab_size:] == [int(gguf.TokenType.UNUSED)] * 20
