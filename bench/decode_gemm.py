"""The products of a batched decode step: the native kernel (csrc/gemv.c) against torch's own GEMM
(F.linear: oneDNN/MKL), at 1, 4, 8 and 16 rows, on GPT-2 124M's four matrix shapes.

    python bench/decode_gemm.py                      # all rows, all shapes, 7 rounds
    python bench/decode_gemm.py --rows 8 16 --repeats 11

Each round times every (rows, shape, contender) once, in an order that rotates from round to
round, so that the two contenders see the same moments of a shared machine. A timing is the
median over --calls calls of CPU time (time.process_time: every thread of the process, spinning
included) and of wall time; the figure printed is the median over rounds, and the ratio
torch/kernel of the two medians (> 1: the kernel is faster). Both run on the same threads
(--threads, default torch.get_num_threads()).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from simplegpt.accel.cpu import decode, lib

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]  # (N, K): c_attn, attn c_proj, c_fc, mlp c_proj


def _time(fn, calls: int) -> tuple[float, float]:
    cpu, wall = [], []
    for _ in range(calls):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=7, help="rounds")
    ap.add_argument("--calls", type=int, default=50, help="calls per timing")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of both (default: torch's)")
    ap.add_argument("--only", choices=["kernel", "torch"], help="time one contender (the kernel's pool spins between "
                    "its calls for a while, and takes cores from torch's threads when both run in one process)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not lib.load():
        raise SystemExit(f"native kernels unavailable: {lib.unavailable_reason()}")
    torch.manual_seed(0)
    weights = {s: (torch.randn(s) * 0.02, torch.randn(s[0]) * 0.02) for s in SHAPES}
    inputs = {(m, s): torch.randn(m, s[1]) for m in args.rows for s in SHAPES}
    cases = [(m, s, name) for m in args.rows for s in SHAPES for name in ("kernel", "torch") if args.only in (None, name)]
    results: dict[tuple, list[tuple[float, float]]] = {c: [] for c in cases}
    with torch.no_grad():
        for r in range(args.repeats):
            order = cases[r % len(cases):] + cases[:r % len(cases)]
            for m, s, name in order:
                w, b = weights[s]
                x = inputs[(m, s)]
                if name == "kernel":
                    fn = lambda: decode.linear(x, w, b)  # noqa: E731
                else:
                    fn = lambda: F.linear(x, w, b)  # noqa: E731
                fn()
                results[(m, s, name)].append(_time(fn, args.calls))
    print(f"# variant {lib.variant()}, {torch.get_num_threads()} threads, {args.repeats} rounds x {args.calls} calls")
    if args.only:
        for m, s, name in cases:
            c, w = (statistics.median(v[i] for v in results[(m, s, name)]) for i in (0, 1))
            print(f"{m:4d}  {s[0]:4d}x{s[1]:<4d}  {name} cpu {c * 1e6:.1f} us, wall {w * 1e6:.1f} us")
        return
    print("rows  N x K        kernel cpu us  torch cpu us  cpu ratio  kernel wall us  torch wall us  wall ratio")
    for m in args.rows:
        for s in SHAPES:
            k = results[(m, s, "kernel")]
            t = results[(m, s, "torch")]
            kc, tc = statistics.median(c for c, _ in k), statistics.median(c for c, _ in t)
            kw, tw = statistics.median(w for _, w in k), statistics.median(w for _, w in t)
            print(f"{m:4d}  {s[0]:4d}x{s[1]:<4d}  {kc * 1e6:13.1f}  {tc * 1e6:12.1f}  {tc / kc:9.2f}"
                  f"  {kw * 1e6:14.1f}  {tw * 1e6:13.1f}  {tw / kw:10.2f}")


if __name__ == "__main__":
    main()
