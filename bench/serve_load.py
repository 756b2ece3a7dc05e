"""Serving under load: many concurrent clients against `simplegpt serve` (continuous batching).

    python bench/serve_load.py                          # GPT-2 124M shape, random weights, 1/4/16/32 clients
    python bench/serve_load.py --preset tiny --clients 1,4 --new-tokens 16   # a quick check
    python bench/serve_load.py --also http://127.0.0.1:8080/v1   # the same load on another server (llama-server)
    python bench/serve_load.py --clients 16 --distinct-prompts --also http://127.0.0.1:8080/v1

A random-weight checkpoint is written to a temporary folder and served by a real `simplegpt serve`
process on 127.0.0.1 (--max-batch, access log off). For each number of clients, every client sends
--requests streamed greedy completions one after another (a 16-token prompt, --new-tokens new tokens,
EOS ignored), all clients at once; the same prompt every time, or with --distinct-prompts a prompt of
its own for every request (16 other token ids), so that no server skips a prefill by reusing a cached
prompt (llama-server keeps its slots' prompts and reuses a matching one). Printed per level: requests, errors, aggregate generated tokens/s
and requests/s, p50/p99 latency and time to first token, and the tokens/s as a ratio of one client's.
--also URL measures an OpenAI-compatible server already running (llama.cpp's `llama-server --parallel 16`
on the same model as GGUF: ../shared/bench/llamacpp_anchor.sh builds it) with the same load, in the same run,
after simplegpt's server has stopped, and prints simplegpt's tokens/s as a ratio of its own, level by level.
Its token counts come from the stream's usage (or llama-server's timings); a server that sends neither
is counted at max_tokens and flagged. Last, the goals below as measured.
Goals on the 2-core CPU (issue 18): 16 clients >= 4x one client's tokens/s, no errors, p99 time to
first token at 16 clients under 2 s; (issue 28) at 16 clients >= 1.2x llama-server's tokens/s with a
p99 time to first token <= 2x llama-server's.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from random_server import served_random_model  # bench/: the random checkpoint and its server


@dataclass
class Level:
    """What one number of clients measured."""

    clients: int
    seconds: float = 0.0
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    uncounted: int = 0  # requests whose server sent no token count (max_tokens assumed)

    @property
    def rate(self) -> float:
        """Aggregate generated tokens per second."""
        return self.tokens / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def one_request(client, url: str, body: dict, level: Level) -> None:
    import httpx

    start = time.perf_counter()
    first = None
    counted = False
    try:
        async with client.stream("POST", f"{url}/completions", json=body) as r:
            if r.status_code != 200:
                level.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text") and first is None:
                    first = time.perf_counter() - start
                if chunk.get("usage") and not counted:
                    level.tokens += chunk["usage"]["completion_tokens"]
                    counted = True
                elif not counted and (chunk.get("timings") or {}).get("predicted_n"):  # llama-server's own count
                    level.tokens += chunk["timings"]["predicted_n"]
                    counted = True
    except httpx.HTTPError as e:
        level.errors.append(f"{type(e).__name__}: {e}")
        return
    if not counted:  # a server that reports no count: the request's own length (EOS is ignored)
        level.tokens += body["max_tokens"]
        level.uncounted += 1
    level.latencies.append(time.perf_counter() - start)
    if first is not None:
        level.ttfts.append(first)


async def run_level(url: str, model: str, clients: int, requests: int, prompts: Iterator[str],
                    new_tokens: int) -> Level:
    """One level's load: each request takes the next of prompts."""
    import httpx

    level = Level(clients)
    body = {"model": model, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers={"Authorization": "Bearer unused"}) as client:
        async def one_client() -> None:
            for _ in range(requests):
                await one_request(client, url, {**body, "prompt": next(prompts)}, level)

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        level.seconds = time.perf_counter() - start
    return level


def report(name: str, levels: list[Level]) -> None:
    print(f"\n{name}")
    print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'tokens/s':>9} {'x 1 client':>10} {'req/s':>6} "
          f"{'p50 lat':>8} {'p99 lat':>8} {'p50 TTFT':>9} {'p99 TTFT':>9}")
    base = None
    for lv in levels:
        rate = lv.rate
        base = base or rate
        print(f"{lv.clients:>7} {len(lv.latencies) + len(lv.errors):>8} {len(lv.errors):>6} {rate:>9.1f} "
              f"{rate / base if base else 0:>10.2f} {len(lv.latencies) / lv.seconds:>6.2f} "
              f"{percentile(lv.latencies, 50):>7.2f}s {percentile(lv.latencies, 99):>7.2f}s "
              f"{percentile(lv.ttfts, 50):>8.3f}s {percentile(lv.ttfts, 99):>8.3f}s")
        for e in lv.errors[:3]:
            print(f"        error: {e}")
        if lv.uncounted:
            print(f"        {lv.uncounted} requests without a token count from the server: max_tokens assumed")


def compare(ours: list[Level], theirs: list[Level], name: str) -> None:
    """simplegpt's aggregate tokens/s as a ratio of the other server's, level by level (same run, same load)."""
    print(f"\nsimplegpt serve / {name}, aggregate tokens/s")
    for a, b in zip(ours, theirs):
        ratio = a.rate / b.rate if b.rate else float("nan")
        print(f"{a.clients:>7} clients: {a.rate:9.1f} / {b.rate:9.1f} = {ratio:5.2f}x")


def goals(levels: list[Level], other: list[Level] | None) -> None:
    """Issues 18's and 28's goals, each as measured in this run (only the levels that were run)."""
    by = {lv.clients: lv for lv in levels}
    print("\ngoals (issues 18 and 28)")
    if 1 in by and 16 in by and by[1].rate:
        print(f"  16 clients >= 4x one client's tokens/s: {by[16].rate / by[1].rate:.2f}x")
    theirs = {lv.clients: lv for lv in other}.get(16) if other is not None else None
    if theirs is not None and 16 in by and theirs.rate:
        print(f"  16 clients >= 1.2x the other server's tokens/s: {by[16].rate / theirs.rate:.2f}x")
        ours_ttft, their_ttft = percentile(by[16].ttfts, 99), percentile(theirs.ttfts, 99)
        print(f"  p99 time to first token at 16 clients <= 2x the other server's: {ours_ttft:.3f} s / "
              f"{their_ttft:.3f} s = {ours_ttft / their_ttft:.2f}x")
    print(f"  no errors: {sum(len(lv.errors) for lv in levels)} errors")
    if 16 in by:
        print(f"  p99 time to first token at 16 clients < 2 s: {percentile(by[16].ttfts, 99):.3f} s")


def prompt_stream(tokenizer, prompt: str, first: int | None) -> Iterator[str]:
    """The requests' prompts: `prompt` every time (first None), or a new one each time: the text of 16
    consecutive token ids from `first` on, which no earlier prompt of the run had."""
    if first is None:
        return itertools.repeat(prompt)
    return (tokenizer.decode(list(range(start, start + 16))) for start in itertools.count(first, 16))


def measure(url: str, model: str, args: argparse.Namespace, prompts: Iterator[str]) -> list[Level]:
    levels = []
    for clients in args.clients:
        levels.append(asyncio.run(run_level(url, model, clients, args.requests, prompts, args.new_tokens)))
    return levels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2", help="model shape for random weights (gpt2 = 124M)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 32],
                   help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    p.add_argument("--also", metavar="URL",
                   help="an OpenAI-compatible API (its /v1 address, e.g. llama-server's http://127.0.0.1:8080/v1), "
                        "already running, measured after simplegpt with the same load and compared level by level")
    p.add_argument("--also-model", default="model", help="the model name to send to --also")
    p.add_argument("--distinct-prompts", action="store_true",
                   help="a prompt of its own for every request (default: the same 16-token prompt every time)")
    args = p.parse_args()
    try:
        import httpx  # noqa: F401
    except ImportError:
        p.error("needs httpx and the serve extra: pip install -e '.[dev]'")

    serve_args = ("--max-batch", str(args.max_batch), "--no-access-log",
                  "--max-queue", str(max(256, 2 * max(args.clients))))
    with served_random_model(args.preset, *serve_args) as (model, tokenizer, prompt, url):
        print(f"simplegpt serve: {args.preset} shape ({model.num_parameters() / 1e6:.0f}M parameters), "
              f"--max-batch {args.max_batch}, {args.new_tokens} new tokens a request, {args.requests} requests "
              f"a client, {'distinct prompts' if args.distinct_prompts else 'the same prompt'}, "
              f"{torch.get_num_threads()} threads")
        asyncio.run(run_level(url, "bench", 1, 1, itertools.repeat(prompt), 4))  # warm-up
        # distinct prompts start at token ids of their own in each run: a server kept running between
        # runs (llama-server) has not seen them
        first = random.randrange(2000, 40000) if args.distinct_prompts else None
        ours = measure(url, "bench", args, prompt_stream(tokenizer, prompt, first))
        report("simplegpt serve", ours)
    theirs = None
    if args.also:
        url = args.also.rstrip("/")
        asyncio.run(run_level(url, args.also_model, 1, 1, itertools.repeat(prompt), 4))  # warm-up
        # the same prompts as simplegpt got, in the same order
        theirs = measure(url, args.also_model, args, prompt_stream(tokenizer, prompt, first))
        report(url, theirs)
        compare(ours, theirs, url)
    goals(ours, theirs)


if __name__ == "__main__":
    main()
