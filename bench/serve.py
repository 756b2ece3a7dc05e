"""What serving costs: decode speed through `simplegpt serve` against the engine called directly, in one run.

    python bench/serve.py                      # GPT-2 124M shape, random weights, GPT-2 tokenizer
    python bench/serve.py --preset small --new-tokens 100

A random-weight checkpoint is written to a temporary folder and served by a real `simplegpt serve`
process on 127.0.0.1. The same greedy request (a 16-token prompt, --new-tokens new tokens, EOS
ignored) is timed three ways, interleaved over --repeats rounds, best of each:
  engine    Engine.generate in this process (the reference)
  API       POST /v1/completions through OpenAI's Python client
  stream    the same with stream=True, until [DONE]; also the time to the first piece
and the API's tokens/s are printed as a ratio of the engine's. Both sides run the same kernels,
so the ratio is the HTTP, JSON and event-stream overhead (goal: >= 0.95).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from random_server import served_random_model  # bench/: the random checkpoint and its server

from simplegpt.engine import Engine, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2", help="model shape for random weights (gpt2 = 124M)")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens generated per request")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds; each way's best counts")
    args = p.parse_args()
    try:
        import openai
    except ImportError:
        p.error("needs OpenAI's client and the serve extra: pip install -e '.[dev]'")

    with served_random_model(args.preset) as (model, tokenizer, prompt, url):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=20, timeout=600)
        engine = Engine(model, tokenizer)
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eos=False)
        request = dict(model="bench", prompt=prompt, max_tokens=args.new_tokens, temperature=0,
                       extra_body={"ignore_eos": True})
        texts: dict[str, str] = {}

        def run_engine() -> None:
            texts["engine"] = engine.generate([prompt], params)[0].text

        def run_api() -> None:
            out = client.completions.create(**request)
            assert out.usage.completion_tokens == args.new_tokens, out.usage
            texts["API"] = out.choices[0].text

        first: list[float] = []

        def run_stream() -> None:
            t0, pieces = time.perf_counter(), []
            for chunk in client.completions.create(**request, stream=True):
                if chunk.choices and chunk.choices[0].text:
                    if not pieces:
                        first.append(time.perf_counter() - t0)
                    pieces.append(chunk.choices[0].text)
            texts["stream"] = "".join(pieces)

        ways = {"engine": run_engine, "API": run_api, "stream": run_stream}
        for run in ways.values():  # warm-up: the server's kernels, the client's connection
            run()
        best = dict.fromkeys(ways, float("inf"))
        for _ in range(args.repeats):
            for name, run in ways.items():
                t0 = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - t0)
    if len(set(texts.values())) != 1:
        sys.exit("the three ways generated different text: the comparison would be meaningless")
    print(f"model: {args.preset} random weights, {model.num_parameters() / 1e6:.1f}M parameters; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; prompt 16 tokens, {args.new_tokens} new tokens")
    rate = {name: args.new_tokens / t for name, t in best.items()}
    for name in ways:
        print(f"{name:8s} {rate[name]:8.1f} tok/s")
    print(f"stream: first piece after {min(first) * 1e3:.0f} ms")
    print(f"\nratios\n  API / engine      {rate['API'] / rate['engine']:.3f}x  (goal >= 0.95)"
          f"\n  stream / engine   {rate['stream'] / rate['engine']:.3f}x  (goal >= 0.95)")


if __name__ == "__main__":
    main()
