"""bench/generate.py's report, run for real on a small random model against a stand-in llama-bench
(a script that answers llama-bench's JSON): each figure is printed under the heading that describes it."""

import os
import subprocess
import sys

from conftest import ROOT

FAKE_LLAMA_BENCH = """#!{python}
import json, sys
models = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "-m"]
print(json.dumps([{{"model_filename": m, "n_gen": 4, "samples_ts": [100.0, 110.0]}} for m in models]))
"""


def test_the_whole_call_ratios_to_llama_cpp_are_not_printed_under_decode_alone(tmp_path):
    """The "cached / llama.cpp f32" ratio (simplegpt's whole call, prefill included) was printed under the
    "decode alone" heading, which says the prefill is taken out."""
    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable))
    fake.chmod(0o755)
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "generate.py"), "--preset", "mini", "--new-tokens", "4",
                          "--uncached-tokens", "2", "--repeats", "1", "--skip-hf", "--read-mb", "0", "--batch", "0",
                          "--llama-bench", str(fake), "--text", str(ROOT / "README.md"), "--quality-tokens", "32",
                          "--threads", "1"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    ratios, decode = out.stdout.split("\nratios\n", 1)[1].split("\ndecode alone (", 1)
    assert "cached / llama.cpp f32" in ratios and "int8   / llama.cpp q8_0" in ratios
    assert "decode alone / llama.cpp f32" in decode and "cached / llama.cpp f32" not in decode
    assert "includes the prefill" not in decode.split("\n\n")[0]
