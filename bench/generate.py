"""Batch-1 decode speed: simplegpt (cached, uncached, int8, compiled) against Hugging Face generate, in one run.

    python bench/generate.py                      # GPT-2 124M shape, random weights, fp32, CPU
    python bench/generate.py --new-tokens 50 --uncached-tokens 20 --preset small
    python bench/generate.py --checkpoint runs/x  # a trained model: speed and int8 quality on real text
    python bench/generate.py --llama-bench /tmp/llamasrc/.../build/bin/llama-bench   # + llama.cpp, same run
    python bench/generate.py --compile            # + Engine(compile=True), against the eager engine
    python bench/generate.py --device cuda --compile --skip-llama   # GPU: compiled (CUDA graphs) vs HF eager
    python bench/generate.py --contention --preset mini --repeats 7  # decode beside a busy process
    python bench/generate.py --preset smollm2-135m --batch 0  # a Llama-style model against LlamaForCausalLM

With --llama-bench (built by ../shared/bench/llamacpp_anchor.sh, which also writes the random GPT-2
GGUF files it reads for --preset gpt2), llama.cpp's f32 and q8_0 decode speeds are measured at the
start of each round and after the last (2 repetitions each), with the same threads, prompt and
new-token counts, and the ratios are printed against its best repetition, as simplegpt's best round
counts (its figure excludes the prompt, simplegpt's includes the prefill; the "decode alone" lines take
the prompt out of simplegpt's too: the best call less the best one-token call of the same engine,
timed beside it in every round). For another preset the
bench model itself is written as f32 and q8_0 GGUF files (simplegpt.gguf_export.write_gguf, what
`simplegpt export-gguf` writes, with the byte tokenizer's vocabulary padded to the model's), so
llama.cpp decodes the same weights. Where llama.cpp's repacked q8_0 kernels die of SIGILL (seen
on some AVX-512 hosts) its measurement is retried with `--repack 0`, and the output says so.

A Llama-style preset (llama-*, smollm2-135m, qwen3-0.6b) is measured against Hugging Face's
LlamaForCausalLM or Qwen3ForCausalLM of the same shape (random weights as well).
Every engine decodes greedily from the same 16-token prompt; tokens/s count generated tokens
over the whole call (prefill included), best of --repeats rounds that interleave the engines; the
"decode alone" lines (cached fp32 and int8) count the tokens after the first over the best call less
the best one-token call of the same engine (the prefill and first token), timed beside it in every round.
"batch 8" (--batch) decodes 8 prompts of 16, 15, ..., 9 tokens (left-padded) in one call, and
counts the tokens of all rows.
"uncached" is the engine re-encoding its context every token (head on the last position only);
"tutorial loop" is the plain loop simplegpt had before (full forward, logits everywhere).
The int8 quality figures compare the quantized model with fp32 on --text: mean loss and how
often the greedy next token agrees under teacher forcing, plus how many generated tokens agree.
"compiled" (--compile) is Engine(compile=True) on its own copy of the model: every decode step one
torch.compile'd function over the static cache (CUDA graphs on a GPU); its compilation happens in
a warm-up call before the timed rounds. On --device cuda the int8 engine and its quality check
(CPU only) are skipped, and every timing synchronizes the GPU before the clock is read.

On the CPU, a C read loop (bench/read_bandwidth.c, one thread per core, --read-mb of memory, best
of 3 passes) measures the memory bandwidth just before and just after every timed call of the
cached fp32 and int8 engines (the host's bandwidth swings within minutes, so a limit measured
once means little), and each call is printed as a fraction of it: the weight bytes a decode step
reads (fp32: 4 a parameter, wpe left out; int8: 1 a linear weight, 4 a row scale and a bias or
LayerNorm float) times its tokens/s, over the mean of the two read figures (tokens/s counts the
prefill too, and the KV cache's reads are left out, so the fraction is a slight underestimate).

--contention measures only the cached engine, on the CPU, with the threads `simplegpt generate`
picks by default (decode_threads: the cores other processes leave idle), with one thread per core
and with one thread, in rounds that interleave the three (each first in turn), each timing as
many calls as one thread makes in ~0.3 s: first alone, then beside a process that keeps one core
busy (a tight Python loop, pinned to --busy-cpu where given). It prints each
setting's median tokens/s with the range over the rounds, and each setting's ratio to the one
thread of the same round (median and range).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simplegpt.accel.cpu.threads import decode_threads  # noqa: E402
from simplegpt.engine import Engine, SamplingParams  # noqa: E402
from simplegpt.model import GPT, preset_config  # noqa: E402
from simplegpt.quantize import quantize_int8  # noqa: E402

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
READ_LOOP = Path(__file__).resolve().parent / "read_bandwidth.c"


class ReadLoop:
    """The memory-bandwidth limit: bench/read_bandwidth.c reading `mb` MB with `threads` threads."""

    def __init__(self, mb: int, threads: int):
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            raise SystemExit("the read loop needs a C compiler (set CC), or pass --read-mb 0")
        self._dir = tempfile.TemporaryDirectory(prefix="simplegpt-read-")
        so = Path(self._dir.name) / "read_bandwidth.so"
        subprocess.run([cc, "-O3", "-shared", "-fPIC", "-pthread", "-o", str(so), str(READ_LOOP)], check=True)
        self.lib = ctypes.CDLL(str(so))
        self.lib.read_all.restype = ctypes.c_uint64
        self.lib.read_all.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.buf = torch.ones(mb * 2**20 // 8, dtype=torch.int64)  # written: every page is in memory
        self.threads = threads

    def gbps(self, passes: int = 3) -> float:
        """GB/s of the best of `passes` reads of the whole buffer."""
        best = math.inf
        for _ in range(passes):
            t0 = time.perf_counter()
            total = self.lib.read_all(self.buf.data_ptr(), self.buf.numel() * 8, self.threads)
            best = min(best, time.perf_counter() - t0)
            assert total == self.buf.numel(), "the read loop missed words"
        return self.buf.numel() * 8 / best / 1e9


def bytes_per_token(model: GPT, int8: bool) -> int:
    """Weight bytes one batch-1 decode step reads: every parameter but the position embeddings (one
    row of them is read); the head is the tied token embedding. int8: 1 byte a linear weight (the
    blocks' and the head's) plus a 4-byte scale per row, 4 bytes a float of the rest."""
    total = 0
    for name, p in model.named_parameters():
        if name == "transformer.wpe.weight":
            continue
        total += p.numel() + 4 * p.size(0) if int8 and p.dim() == 2 else 4 * p.numel()
    return total


def timed(fn, device: torch.device) -> float:
    """Seconds fn takes, with the GPU's queued work finished before and after on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def simplegpt_runner(engine: Engine, prompt: list[int], n: int, out: list[int], warmup: int = 4):
    """A warmed-up call that generates n greedy tokens (kept in `out`)."""
    params = SamplingParams(max_new_tokens=n, temperature=0.0, stop_at_eos=False)
    engine.generate([prompt], SamplingParams(max_new_tokens=warmup, temperature=0.0, stop_at_eos=False))

    def run() -> None:
        out[:] = engine.generate([prompt], params)[0].token_ids

    return run


def tutorial_runner(model: GPT, prompt: list[int], n: int):
    """The loop simplegpt had before the engine (and the tutorial's): the whole context through
    forward (logits at every position) for every new token."""

    @torch.inference_mode()
    def run() -> None:
        seq = torch.tensor([prompt], device=model.transformer.wte.weight.device)
        for _ in range(n):
            logits, _ = model(seq[:, -model.config.n_positions:])
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)

    return run


def simplegpt_batch_runner(engine: Engine, prompts: list[list[int]], n: int):
    """A warmed-up call that generates n greedy tokens for each prompt, all in one batch."""
    params = SamplingParams(max_new_tokens=n, temperature=0.0, stop_at_eos=False)
    engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.0, stop_at_eos=False))
    return lambda: engine.generate(prompts, params)


def hf_runner(model: GPT, prompts: list[list[int]], n: int):
    """Hugging Face generate, greedy with its KV cache, of n tokens for each prompt (left-padded to a batch)."""
    import transformers

    cfg = model.config
    if cfg.is_gpt2:
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, attn_implementation="sdpa"))
    else:  # a Llama-style preset: the LlamaForCausalLM / Qwen3ForCausalLM of the same shape
        from simplegpt import hf_llama

        kind = hf_llama.hf_class_for(cfg)
        doc = hf_llama.config_to_hf(cfg, kind, eos_id=0, bos_id=0)
        doc.pop("model_type")
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(kind, **doc),
                                                           attn_implementation="sdpa")
    hf = hf.eval().to(model.transformer.wte.weight.device)
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, attention_mask=mask)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=4, **kw)

    @torch.inference_mode()
    def run() -> None:
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    return run


_LLAMA_EXTRA: list[str] = []  # llama-bench's extra options, once its default died of SIGILL


def llama_bench(binary: str, models: dict[str, str], threads: int, prompt_len: int, n: int) -> dict[str, list[float]]:
    """llama.cpp decode tokens/s (its tg test, 2 repetitions) for each GGUF file, from llama-bench's JSON output."""
    args = [binary, "-t", str(threads), "-p", str(prompt_len), "-n", str(n), "-r", "2", "-o", "json"]
    for path in models.values():
        args += ["-m", path]
    out = subprocess.run(args + _LLAMA_EXTRA, capture_output=True, text=True)
    if out.returncode == -signal.SIGILL and not _LLAMA_EXTRA:
        print("llama-bench died of SIGILL (an instruction this CPU lacks): measured with --repack 0 from now on")
        _LLAMA_EXTRA.extend(["--repack", "0"])
        out = subprocess.run(args + _LLAMA_EXTRA, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"llama-bench failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    rows = json.loads(out.stdout)
    by_file = {r["model_filename"]: r["samples_ts"] for r in rows if r["n_gen"] > 0}
    return {name: by_file[path] for name, path in models.items()}


def write_bench_gguf(model: GPT, folder: Path) -> dict[str, str]:
    """The bench model as f32 and q8_0 GGUF files in folder (what `simplegpt export-gguf` writes), with
    the byte tokenizer's vocabulary padded to the model's: llama.cpp's side of the same weights."""
    from simplegpt.gguf_export import write_gguf
    from simplegpt.tokenizer import ByteTokenizer

    files = {}
    for name, kind in (("llama.cpp f32", "f32"), ("llama.cpp q8_0", "q8_0")):
        t0 = time.perf_counter()
        result = write_gguf(model, ByteTokenizer(), folder / f"bench-{kind}.gguf", type=kind, progress=False)
        print(f"wrote {result.path} ({result.architecture}, {kind}, {result.bytes / 1e6:.0f} MB) "
              f"in {time.perf_counter() - t0:.0f}s")
        files[name] = str(result.path)
    return files


def busy_process(cpu: int | None) -> subprocess.Popen:
    """A process that keeps one core busy (a tight Python loop), pinned to `cpu` where given."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    return proc


def contention(model: GPT, prompt: list[int], args: argparse.Namespace) -> None:
    """--contention: decode tokens/s with the default threads, torch's (one per core) and one, alone and beside a
    busy process (see the module docstring)."""
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eos=False)
    cores = torch.get_num_threads()
    where = "not pinned" if args.busy_cpu is None else f"pinned to CPU {args.busy_cpu}"
    for phase in ("alone", f"beside a busy process ({where})"):
        busy = busy_process(args.busy_cpu) if phase != "alone" else None
        try:
            if busy is not None:
                time.sleep(0.5)  # under way before the threads are picked
            default = decode_threads()
            settings = {f"default ({default})": default, f"{cores} threads": cores, "1 thread": 1}
            times: dict[str, list[float]] = {name: [] for name in settings}
            for name, threads in settings.items():
                torch.set_num_threads(threads)
                engine.generate([prompt], SamplingParams(max_new_tokens=4, temperature=0.0, stop_at_eos=False))
            # each timing runs as many calls as one thread makes in ~0.3 s: a call of a small model
            # takes a few scheduler time slices, and the other processes' turns would decide it
            torch.set_num_threads(1)
            calls = max(1, round(0.3 / timed(lambda: engine.generate([prompt], params), torch.device("cpu"))))
            for r in range(args.repeats):
                order = list(settings.items())
                for name, threads in order[r % 3:] + order[: r % 3]:  # each setting first in turn
                    torch.set_num_threads(threads)
                    times[name].append(timed(lambda: [engine.generate([prompt], params) for _ in range(calls)],
                                             torch.device("cpu")) / calls)
        finally:
            torch.set_num_threads(cores)
            if busy is not None:
                busy.kill()
                busy.wait()
        print(f"\n{phase}: tokens/s, median [range] of {args.repeats} rounds of {calls} calls each; ratio to 1 "
              "thread in the same round")
        for name, ts in times.items():
            rates = [args.new_tokens / t for t in ts]
            ratios = [one / t for t, one in zip(ts, times["1 thread"])]
            print(f"  {name:18s} {statistics.median(rates):8.1f} [{min(rates):.1f}-{max(rates):.1f}]   "
                  f"{statistics.median(ratios):5.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]")


@torch.inference_mode()
def quality(fp32: GPT, int8: GPT, ids: torch.Tensor) -> tuple[float, float, float]:
    """(fp32 loss, int8 loss, greedy agreement) on rows of token ids (B, T), teacher forced."""
    a, _ = fp32(ids[:, :-1])
    b, _ = int8(ids[:, :-1])
    target = ids[:, 1:].reshape(-1)
    loss_a = F.cross_entropy(a.reshape(-1, a.size(-1)), target).item()
    loss_b = F.cross_entropy(b.reshape(-1, b.size(-1)), target).item()
    return loss_a, loss_b, (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2", help="model shape for random weights (gpt2 = 124M)")
    p.add_argument("--checkpoint", help="measure this checkpoint instead of random weights")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens generated per timed call")
    p.add_argument("--uncached-tokens", type=int, default=200,
                   help="tokens for the slow uncached loops, timed once (fewer = shorter contexts, which flatters them)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds; each engine's best counts")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="text for the int8 quality check")
    p.add_argument("--quality-tokens", type=int, default=1024, help="tokens of --text scored for int8 quality")
    p.add_argument("--skip-hf", action="store_true", help="don't measure Hugging Face generate")
    p.add_argument("--batch", type=int, default=8,
                   help="also decode this many prompts of different lengths in one batch, simplegpt and Hugging "
                        "Face (0 = skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the models run; cuda skips int8 (CPU only)")
    p.add_argument("--compile", action="store_true",
                   help="also measure Engine(compile=True): compiled static-cache decode steps (CUDA graphs on cuda)")
    p.add_argument("--llama-bench", metavar="PATH", help="llama.cpp's llama-bench binary: measure llama.cpp too")
    p.add_argument("--skip-llama", action="store_true", help="don't measure llama.cpp even if --llama-bench is given")
    p.add_argument("--gguf-f32", help="f32 GGUF for --llama-bench (default: /tmp/gpt2-rand-f32.gguf for --preset gpt2, "
                   "else the bench model written as GGUF)")
    p.add_argument("--gguf-q8", help="q8_0 GGUF for --llama-bench (default: as --gguf-f32, q8_0)")
    p.add_argument("--read-mb", type=int, default=512,
                   help="MB the C read loop (the bandwidth limit) reads on the CPU; 0 = don't measure it")
    p.add_argument("--contention", action="store_true",
                   help="measure only the cached engine's decode with the default threads, one per core and one "
                        "thread, alone and beside a busy process (CPU)")
    p.add_argument("--busy-cpu", type=int, metavar="N", help="with --contention: pin the busy process to CPU N")
    args = p.parse_args()
    if args.contention and args.device != "cpu":
        p.error("--contention measures CPU decoding: drop --device")
    if args.busy_cpu is not None and args.busy_cpu not in os.sched_getaffinity(0):
        p.error(f"--busy-cpu {args.busy_cpu}: this process may use CPUs {sorted(os.sched_getaffinity(0))}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    if args.skip_llama:
        args.llama_bench = None
    if args.llama_bench and args.checkpoint and not (args.gguf_f32 and args.gguf_q8):
        p.error("--llama-bench with --checkpoint: give its GGUF files (--gguf-f32, --gguf-q8; "
                "simplegpt export-gguf writes them)")
    if args.llama_bench and args.preset == "gpt2" and not args.checkpoint:
        args.gguf_f32 = args.gguf_f32 or "/tmp/gpt2-rand-f32.gguf"
        args.gguf_q8 = args.gguf_q8 or "/tmp/gpt2-rand-q8_0.gguf"
    for path in [args.llama_bench, args.gguf_f32, args.gguf_q8] if args.llama_bench else []:
        if path is not None and not Path(path).is_file():
            p.error(f"{path} does not exist (../shared/bench/llamacpp_anchor.sh builds llama-bench and writes the GGUF files)")
    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = None
    if args.checkpoint:
        from simplegpt.checkpoint import load_checkpoint

        ck = load_checkpoint(args.checkpoint, device=device)
        model, tokenizer, label = ck.model, ck.tokenizer, args.checkpoint
    else:
        model = GPT(preset_config(args.preset)).eval().to(device)
        label = f"{args.preset} random weights"
    cfg = model.config
    where = (f"{torch.get_num_threads()} threads" if on_cpu
             else f"{torch.cuda.get_device_name(device)}")
    print(f"model: {label}, {model.num_parameters() / 1e6:.1f}M parameters, fp32; torch {torch.__version__}, "
          f"{where}; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens")
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    if args.contention:
        return contention(model, prompt, args)

    fp32_out: list[int] = []
    int8_out: list[int] = []
    compiled_out: list[int] = []
    # Copies made before any Engine prepares `model` in place (the compiled engine lays weights out
    # differently from the native kernels').
    int8 = copy.deepcopy(model) if on_cpu else None
    compiled = copy.deepcopy(model) if args.compile else None
    fp32_engine = Engine(model)
    runners = {"simplegpt cached": simplegpt_runner(fp32_engine, prompt, args.new_tokens, fp32_out)}
    # The same engines' calls of one token (the prefill and the first token), timed beside them, so
    # that their decode rate can be given without the prompt, as llama-bench's tg figure is.
    firsts = {"simplegpt cached": simplegpt_runner(fp32_engine, prompt, 1, [], warmup=1)}
    if compiled is not None:
        t0 = time.perf_counter()
        # Warm-up long enough for the compilation and, on CUDA, the CUDA graph's recording.
        runners["simplegpt compiled"] = simplegpt_runner(Engine(compiled, compile=True), prompt, args.new_tokens,
                                                         compiled_out, warmup=8)
        print(f"compiled engine: warm-up call, compilation included, {time.perf_counter() - t0:.1f}s")
    if not args.skip_hf:
        runners["HF generate"] = hf_runner(model, [prompt], args.new_tokens)
    # A batch of prompts of different lengths (left padding), cut from the same prompt
    batch = [prompt[: max(1, args.prompt_len - i)] for i in range(args.batch)]
    if args.batch:
        runners[f"simplegpt batch {args.batch}"] = simplegpt_batch_runner(Engine(model), batch, args.new_tokens)
        if not args.skip_hf:
            runners[f"HF generate batch {args.batch}"] = hf_runner(model, batch, args.new_tokens)
    if int8 is not None:
        report = quantize_int8(int8)
        int8_engine = Engine(int8)
        runners["simplegpt int8"] = simplegpt_runner(int8_engine, prompt, args.new_tokens, int8_out)
        firsts["simplegpt int8"] = simplegpt_runner(int8_engine, prompt, 1, [], warmup=1)
    slow = {"simplegpt uncached": simplegpt_runner(Engine(model, use_cache=False), prompt, args.uncached_tokens, []),
            "tutorial loop": tutorial_runner(model, prompt, args.uncached_tokens)}
    gguf = {"llama.cpp f32": args.gguf_f32, "llama.cpp q8_0": args.gguf_q8}
    written = None  # the folder of GGUF files written for this run, removed after the last measurement
    if args.llama_bench and not (args.gguf_f32 and args.gguf_q8):
        written = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
        gguf = write_bench_gguf(model, written)
    llama: list[dict[str, list[float]]] = []
    reader = ReadLoop(args.read_mb, len(os.sched_getaffinity(0))) if on_cpu and args.read_mb > 0 else None
    # per round: (seconds, the read loop's GB/s just before, just after) of the bandwidth-bound engines
    bound: dict[str, list[tuple[float, float, float]]] = {"simplegpt cached": [], "simplegpt int8": []}

    def measure_llama() -> None:
        if args.llama_bench:
            llama.append(llama_bench(args.llama_bench, gguf, torch.get_num_threads(), args.prompt_len,
                                     args.new_tokens))

    # Rounds interleave the engines, llama.cpp included, so that load from other jobs (which comes
    # and goes over minutes on shared machines) hits them alike; the best counts. The slow
    # uncached loops run in the first round only.
    best = {name: math.inf for name in [*runners, *slow]}
    best_first = {name: math.inf for name in firsts}
    for r in range(args.repeats):
        measure_llama()
        for name, run in [*runners.items(), *(slow.items() if r == 0 else [])]:
            limited = reader is not None and name in bound
            before = reader.gbps() if limited else 0.0
            t = timed(run, device)
            if limited:
                bound[name].append((t, before, reader.gbps()))
            best[name] = min(best[name], t)
            if name in firsts and args.new_tokens > 1:
                best_first[name] = min(best_first[name], timed(firsts[name], device))
    measure_llama()  # and after the last round
    if written is not None:
        shutil.rmtree(written)
    rows = {name: args.batch if "batch" in name else 1 for name in best}  # tokens per step
    rates = {name: rows[name] * (args.uncached_tokens if name in slow else args.new_tokens) / t
             for name, t in best.items()}
    if llama:
        # Best against best: its best repetition, as simplegpt's best round counts.
        for name in gguf:
            means = ", ".join(f"{sum(run[name]) / len(run[name]):.1f}" for run in llama)
            rates[name] = max(x for run in llama for x in run[name])
            print(f"{name:20s} {rates[name]:8.1f} tok/s best; per measurement {means}")
    batched = (f"simplegpt batch {args.batch}", f"HF generate batch {args.batch}")
    for name in ("simplegpt cached", "simplegpt compiled", "simplegpt uncached", "tutorial loop", "HF generate",
                 "simplegpt int8", *batched):
        if name in rates:
            extra = f" ({args.uncached_tokens} tokens)" if name in slow else " (all rows)" if name in batched else ""
            print(f"{name:20s} {rates[name]:8.1f} tok/s{extra}")

    print("\nratios")
    print(f"  cached / uncached      {rates['simplegpt cached'] / rates['simplegpt uncached']:6.2f}x")
    print(f"  cached / tutorial loop {rates['simplegpt cached'] / rates['tutorial loop']:6.2f}x")
    if "HF generate" in rates:
        print(f"  cached / HF generate   {rates['simplegpt cached'] / rates['HF generate']:6.2f}x")
        if "simplegpt int8" in rates:
            print(f"  int8   / HF generate   {rates['simplegpt int8'] / rates['HF generate']:6.2f}x")
    if "simplegpt int8" in rates:
        print(f"  int8   / cached fp32   {rates['simplegpt int8'] / rates['simplegpt cached']:6.2f}x")
    if all(name in rates for name in batched):
        print(f"  batch {args.batch} / HF batch {args.batch}  {rates[batched[0]] / rates[batched[1]]:6.2f}x")
    if args.llama_bench:
        print(f"  cached / llama.cpp f32 {rates['simplegpt cached'] / rates['llama.cpp f32']:6.2f}x  (goal >= 1; "
              "simplegpt's call includes the prefill, llama.cpp's tg figure does not)")
        print(f"  int8   / llama.cpp q8_0 {rates['simplegpt int8'] / rates['llama.cpp q8_0']:5.2f}x  (goal >= 0.75)")
    if "simplegpt compiled" in rates:
        print(f"  compiled / cached      {rates['simplegpt compiled'] / rates['simplegpt cached']:6.2f}x")
        if "HF generate" in rates:
            print(f"  compiled / HF generate {rates['simplegpt compiled'] / rates['HF generate']:6.2f}x"
                  "  (goal >= 5 on a GPU)")
    if reader is not None:
        print(f"\nthe C read loop ({reader.threads} threads, {args.read_mb} MB) just before and after each timed call")
        for name, label, q in (("simplegpt cached", "fp32", False), ("simplegpt int8", "int8", True)):
            if not bound[name]:
                continue
            nbytes = bytes_per_token(model, q)
            fractions = [nbytes * args.new_tokens / t / ((a + b) / 2 * 1e9) for t, a, b in bound[name]]
            print(f"  decode {label}: {nbytes / 1e6:.0f} MB of weights a token; read loop "
                  + ", ".join(f"{a:.1f}/{b:.1f}" for _, a, b in bound[name]) + " GB/s; decode at "
                  + ", ".join(f"{f * 100:.0f}%" for f in fractions) + f" of it (best {max(fractions) * 100:.0f}%)")
    # Decode alone: the new tokens after the first over the call's time less a one-token call's
    decode = {name: (args.new_tokens - 1) / (best[name] - best_first[name]) for name in firsts
              if name in best and best[name] > best_first[name] < math.inf}
    if decode:
        print("\ndecode alone (best call less the best one-token call of the same engine: the prefill and first token)")
        for name, rate in decode.items():
            print(f"  {name:18s} {rate:8.1f} tok/s  (the one-token call: {best_first[name] * 1e3:.0f} ms)")
    if args.llama_bench:
        for name, other in (("simplegpt cached", "llama.cpp f32"), ("simplegpt int8", "llama.cpp q8_0")):
            if name in decode:
                print(f"  {name.split()[1]:6s} decode alone / {other} {decode[name] / rates[other]:5.2f}x  (both without "
                      "the prompt)")

    if compiled is not None:
        same = next((i for i, (a, b) in enumerate(zip(fp32_out, compiled_out)) if a != b), len(fp32_out))
        print(f"\ncompiled: greedy output identical to the eager engine's for the first {same}/{len(fp32_out)} tokens")
    if int8 is None:
        return
    same = next((i for i, (a, b) in enumerate(zip(fp32_out, int8_out)) if a != b), len(fp32_out))
    print(f"\nint8: linear weights {report.fp32_bytes / 2**20:.0f} MiB -> {report.int8_bytes / 2**20:.0f} MiB "
          f"({report.ratio:.2f}x smaller); greedy output identical for the first {same}/{len(fp32_out)} tokens")
    text_path = Path(args.text)
    if text_path.is_file():
        from simplegpt.tokenizer import get_tokenizer

        tok = tokenizer or get_tokenizer("gpt2")
        ids = tok.encode(text_path.read_text(encoding="utf-8")[: args.quality_tokens * 8])[: args.quality_tokens]
        T = min(cfg.n_positions, 256) + 1
        rows = torch.tensor(ids[: len(ids) // T * T]).view(-1, T)
        if rows.numel():
            la, lb, agree = quality(model, int8, rows)
            print(f"int8 quality on {rows.numel()} tokens of {text_path.name}: loss fp32 {la:.4f}, int8 {lb:.4f} "
                  f"({lb - la:+.4f}); teacher-forced greedy agreement {agree * 100:.1f}%")


if __name__ == "__main__":
    main()
