"""Engine(compile=True): the torch.compile'd static-cache decode step gives the reference's tokens,
with one compilation per batch size. One tiny model shape (test_engine's) throughout, so the
compiled graphs (batch 1 and batch 4) are shared by the tests."""

import math
import os
import shutil
import sys

import pytest
import torch
from torch._dynamo.utils import counters

from simplegpt import get_tokenizer, save_checkpoint
from simplegpt.accel.cpu import decode as native
from simplegpt.cli import main
from simplegpt.engine import Engine, KVCache, SamplingParams
from simplegpt.quantize import quantize_int8
from test_engine import GREEDY, PROMPTS, reference_greedy, tiny


def _compile_unavailable() -> str | None:
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support this Python/platform (torch {torch.__version__})"
    cxx = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")  # inductor's default
    if shutil.which(cxx) is None:
        return f"torch.compile on the CPU (inductor) needs a C++ compiler: {cxx} not found (set CXX)"
    return None


needs_compile = pytest.mark.skipif(_compile_unavailable() is not None, reason=str(_compile_unavailable()))


def truncated_at(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


@needs_compile
def test_compiled_greedy_equals_uncached_reference_alone_batched_and_past_the_window(monkeypatch):
    # The compiled step reads every cache slot, masked or not: uninitialised memory may hold NaN.
    init = KVCache.__init__

    def nan_filled(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.k.fill_(math.nan)
        self.v.fill_(math.nan)

    monkeypatch.setattr(KVCache, "__init__", nan_filled)
    # 40 new tokens with a 16-token window: every prompt slides (eager re-encodes) several times.
    model = tiny()
    engine = Engine(model, compile=True)
    expected = [reference_greedy(model, p, 40, engine.window_shift) for p in PROMPTS]
    assert [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS] == expected
    assert [r.token_ids for r in engine.generate(PROMPTS, GREEDY)] == expected
    # Rows that finish early (EOS) stay in the compiled batch; the others must not notice, through
    # later window re-encodes too (the finished rows are then left out of the cache).
    eos = next(t for t in expected[1][2:] if sum(t in e for e in expected) < len(expected))
    stopped = Engine(model, compile=True, eos_id=eos).generate(PROMPTS, SamplingParams(max_new_tokens=40,
                                                                                       temperature=0.0))
    assert [r.token_ids for r in stopped] == [truncated_at(e, eos) for e in expected]
    assert {r.finish_reason for r in stopped} == {"stop", "length"}


@needs_compile
def test_compiled_sampling_equals_eager_engine_with_the_same_seed():
    params = SamplingParams(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.3,
                            seed=7, stop_at_eos=False)
    eager = [r.token_ids for r in Engine(tiny()).generate(PROMPTS, params)]
    compiled = [r.token_ids for r in Engine(tiny(), compile=True).generate(PROMPTS, params)]
    assert compiled == eager


@needs_compile
def test_one_compilation_serves_every_step_position_and_call():
    engine = Engine(tiny(), compile=True)
    graphs = counters["stats"]["unique_graphs"]
    engine.generate([PROMPTS[0]], GREEDY)
    assert counters["stats"]["unique_graphs"] - graphs <= 1  # 0 when an earlier test compiled batch 1
    graphs = counters["stats"]["unique_graphs"]
    # Other prompt lengths, positions, window slides, a stream, another Engine and model of the same
    # shape: all served by the same compiled step (a recompilation would raise).
    with torch._dynamo.config.patch(error_on_recompile=True):
        engine.generate([list(range(1, 16))], SamplingParams(max_new_tokens=25, temperature=0.0))
        other = Engine(tiny(seed=3), get_tokenizer("byte"), compile=True)
        alone = [other.generate([p], GREEDY)[0].text for p in ("ab", "hello world")]
        # Interleaved streams of one Engine: each call has its own static cache.
        s1, s2 = other.stream("ab", GREEDY), other.stream("hello world", GREEDY)
        pieces = [[], []]
        for a, b in zip(s1, s2):
            pieces[0].append(a)
            pieces[1].append(b)
        pieces[0] += list(s1)
        pieces[1] += list(s2)
        assert ["".join(p) for p in pieces] == alone
    assert counters["stats"]["unique_graphs"] == graphs


def test_native_linears_trace_as_nn_linear_under_torch_compile(monkeypatch):
    # The native backend's view of a model (native linears) can still be compiled: under torch.compile
    # the layers take nn.Linear's forward, not the ctypes kernel dynamo cannot trace.
    engine = Engine(tiny())
    if engine.backend.name != "native":
        pytest.skip(f"simplegpt.native is unavailable here: {native.unavailable_reason()}")
    layer = engine.backend.model.transformer.h[0].mlp.c_fc
    x = torch.randn(1, 32)

    def no_kernel(*args):
        raise AssertionError("the native kernel was called while compiling")

    monkeypatch.setattr(native, "linear", no_kernel)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_bad_combinations_fail_clearly():
    with pytest.raises(ValueError, match="compile=True needs the KV cache"):
        Engine(tiny(), use_cache=False, compile=True)
    int8 = tiny()
    quantize_int8(int8)
    with pytest.raises(ValueError, match="does not support int8"):
        Engine(int8, compile=True)


@needs_compile
def test_generate_cli_compile_flag(tmp_path, capsys):
    tok = get_tokenizer("byte")
    model = tiny()
    checkpoint = save_checkpoint(tmp_path / "tiny", model, tok)
    expected = Engine(tiny(), tok).generate(["ROMEO:"], SamplingParams(max_new_tokens=30, temperature=0.0))[0].text
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "30"]
    assert main([*args, "--temperature", "0", "--compile", "--quiet", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == "ROMEO:" + expected + "\n"
    assert main([*args, "--compile", "--quantize", "int8"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("simplegpt generate: error: --compile does not work with --quantize int8")
    assert len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "torch.compile" in capsys.readouterr().out
