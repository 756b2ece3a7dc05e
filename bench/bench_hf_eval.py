"""Evaluation and Hugging Face conversion speed, against transformers in the same run.

    python bench/bench_hf_eval.py [--preset gpt2] [--tokens 4096] [--stride 512]

1. Sliding-window evaluation: simplegpt.evaluation.perplexity.evaluate_ids vs the Hugging Face perplexity
   recipe (GPT2LMHeadModel with labels, one window per forward) on the same tokens and windows;
   prints both losses (they must agree) and the speed ratio.
2. Conversion of a random GPT-2 of the preset's size: import-hf + export-hf vs transformers'
   own from_pretrained + save_pretrained of the same directory.
Needs the 'hf' extra. The machines are shared: compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def hf_recipe(hf, ids: list[int], context: int, stride: int) -> float:
    seq = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    with torch.inference_mode():
        for begin in range(0, seq.size(1), stride):
            end = min(begin + context, seq.size(1))
            inp = seq[:, begin:end]
            labels = inp.clone()
            labels[:, :-(end - prev_end)] = -100
            n = int((labels[:, 1:] != -100).sum())
            nll += hf(inp, labels=labels).loss.item() * n
            count += n
            prev_end = end
            if end == seq.size(1):
                break
    return nll / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2", help="model size preset (random weights)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of tinyshakespeare to evaluate")
    ap.add_argument("--stride", type=int, default=512, help="window stride")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats; the best is kept")
    args = ap.parse_args()

    import transformers
    from simplegpt import GPT, GPT2Tokenizer, preset_config
    from simplegpt.checkpoint import save_checkpoint
    from simplegpt.evaluation.perplexity import evaluate_ids
    from simplegpt.hf import export_hf, import_hf

    transformers.logging.set_verbosity_error()
    logging.getLogger("simplegpt").setLevel(logging.ERROR)
    torch.manual_seed(0)
    tok = GPT2Tokenizer()
    model = GPT(preset_config(args.preset)).eval()
    context = model.config.n_positions
    text = (Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt").read_text()
    ids = [tok.eos_id] + tok.encode(text[: args.tokens * 8])[: args.tokens]
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"transformers {transformers.__version__}; model {args.preset} "
          f"({model.num_parameters() / 1e6:.1f}M), {len(ids)} tokens, context {context}, stride {args.stride}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_checkpoint(tmp / "ck", model, tok)
        export_hf(tmp / "ck", tmp / "hf")
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp / "hf").eval()

        ours_loss = evaluate_ids(model, ids, tok, context, args.stride).loss
        hf_loss = hf_recipe(hf, ids, context, args.stride)
        t_ours = best_of(args.repeats, lambda: evaluate_ids(model, ids, tok, context, args.stride))
        t_hf = best_of(args.repeats, lambda: hf_recipe(hf, ids, context, args.stride))
        print(f"eval: simplegpt {t_ours:.2f} s ({len(ids) / t_ours:,.0f} tok/s), Hugging Face recipe {t_hf:.2f} s "
              f"({len(ids) / t_hf:,.0f} tok/s): ratio {t_hf / t_ours:.2f}x; loss {ours_loss:.6f} vs {hf_loss:.6f}")

        def ours_convert():
            import_hf(str(tmp / "hf"), tmp / "ck2", overwrite=True)
            export_hf(tmp / "ck2", tmp / "hf2", overwrite=True)

        def hf_convert():
            transformers.GPT2LMHeadModel.from_pretrained(tmp / "hf").save_pretrained(tmp / "hf3")

        t_ours = best_of(args.repeats, ours_convert)
        t_hf = best_of(args.repeats, hf_convert)
        print(f"convert (load + save): simplegpt import-hf + export-hf {t_ours:.2f} s, transformers "
              f"from_pretrained + save_pretrained {t_hf:.2f} s: ratio {t_hf / t_ours:.2f}x")


if __name__ == "__main__":
    main()
