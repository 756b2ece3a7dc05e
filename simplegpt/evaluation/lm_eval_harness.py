"""EleutherAI lm-evaluation-harness support: a simplegpt checkpoint as the lm_eval model "simplegpt".

Python:
    import simplegpt.evaluation.lm_eval_harness, lm_eval   # the import registers the model
    lm_eval.simple_evaluate(model="simplegpt", model_args="checkpoint=ckpt/", tasks=[...])
Command line (lm_eval's own CLI, with the model registered first):
    python -m simplegpt.evaluation.lm_eval_harness run --model simplegpt --model_args checkpoint=ckpt/ --tasks hellaswag

Scoring follows lm_eval's HFLM: context and continuation are encoded together and split, an
empty context is replaced by the end-of-text token, and inputs longer than the model's context
keep their last n_positions tokens. Generation goes through simplegpt's engine: greedy unless a
task sets do_sample; a sampled request is seeded with the model's `seed` (model_args, 1234 by
default) + its position in the request list, so every repeat gets its own sample.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.nn.functional as F

try:
    # lm_eval registers its own models only while its registry is empty; import them first so
    # that registering "simplegpt" does not hide "hf" and the others.
    import lm_eval.models  # noqa: F401
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'the lm_eval adapter needs EleutherAI\'s lm-evaluation-harness: pip install "simplegpt-toolkit[lmeval]"'
    ) from None

from ..generation.engine import Engine
from ..generation.sampling import SamplingParams
from ..hf import load_any

log = logging.getLogger(__name__)
MODEL_NAME = "simplegpt"


@register_model(MODEL_NAME)
class SimpleGPTLM(TemplateLM):
    """lm_eval model over a simplegpt checkpoint (or a Hugging Face GPT-2 directory)."""

    def __init__(self, checkpoint: str, device: str | None = None, batch_size: int | str = 8,
                 max_gen_toks: int = 256, seed: int = 1234, **kwargs: Any) -> None:
        super().__init__()
        from ..devices import default_device

        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's CLI asks for cuda:0 unless told otherwise; run where we can instead of failing.
            log.warning("CUDA is not available; the simplegpt model runs on %s", default_device())
            device = None
        self._device = torch.device(device or default_device())
        ck = load_any(checkpoint, device=self._device)
        if ck.tokenizer is None:
            raise ValueError(f"{checkpoint} has no tokenizer; lm_eval needs one to turn task text into tokens")
        self.model, self.tok = ck.model.eval(), ck.tokenizer
        self.checkpoint = str(checkpoint)
        # lm_eval passes "auto" for automatic batch sizing; a fixed size is enough on these models.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)  # the base of sampled generations' seeds; greedy ones do not use it
        self.engine = Engine(self.model, self.tok, device=self._device)
        if kwargs:
            log.info("simplegpt lm_eval adapter ignores arguments %s", sorted(kwargs))

    @property
    def max_length(self) -> int:
        return self.model.config.n_positions

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def tokenizer_name(self) -> str:
        return f"simplegpt-{self.tok.kind}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)

    @torch.inference_mode()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation given its context, and whether greedy
        decoding would have produced it. Batches are right-padded, which causal attention ignores."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            rows = []
            for i in idx:
                ctx, cont = pairs[i]
                # The model reads all tokens but the last; keep the last max_length of them.
                rows.append(((ctx + cont)[-(self.max_length + 1):][:-1], cont[-self.max_length:]))
            T = max(len(inp) for inp, _ in rows)
            x = torch.zeros(len(rows), T, dtype=torch.long)
            for r, (inp, _) in enumerate(rows):
                x[r, :len(inp)] = torch.tensor(inp)
            logits, _ = self.model(x.to(self._device))
            logprobs = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
            for r, (i, (inp, cont)) in enumerate(zip(idx, rows)):
                n = len(cont)
                lp = logprobs[r, len(inp) - n:len(inp)]  # (n, V): the positions predicting cont
                target = torch.tensor(cont, device=lp.device)
                total = float(lp.gather(1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (total, greedy)
        return results

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              **kwargs: Any) -> list[tuple[float, bool]]:
        results = self._score([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents in disjoint windows of max context (lm_eval's helpers)."""
        out = []
        for (string,) in [req.args for req in requests]:
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(lp for lp, _ in self._score(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation, cut before the first stop string, through simplegpt's engine
        (KV cache, batches of requests that share their generation settings). A sampled request is
        seeded with the adapter's seed + its position in `requests` (modulo 2^64), so repeats of one
        context (a task's `repeats`) each get their own sample, whatever the batch size."""
        groups: dict[str, tuple[SamplingParams, list[int]]] = {}
        for i, req in enumerate(requests):
            params = self._sampling_params(req.args[1])
            groups.setdefault(repr(params), (params, []))[1].append(i)
        out = [""] * len(requests)
        for params, members in groups.values():
            for chunk in self._chunks(members, consecutive=not params.greedy):
                # the engine samples row k with seed + k: a chunk of consecutive requests i.. gives request
                # i + k the seed base + i + k
                seed = (self.seed + chunk[0]) % 2**64
                seeded = params if params.greedy else dataclasses.replace(params, seed=seed)
                # an empty context becomes the end-of-text token inside the engine
                results = self.engine.generate([self.tok_encode(requests[i].args[0]) for i in chunk], seeded)
                for i, result in zip(chunk, results):
                    out[i] = result.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, result.text)
        return out

    def _chunks(self, members: list[int], consecutive: bool) -> list[list[int]]:
        """members (ascending request positions) in batches of at most batch_size; consecutive: each
        batch a run of consecutive positions (what per-position seeds through the engine need)."""
        chunks: list[list[int]] = []
        for i in members:
            if chunks and len(chunks[-1]) < self.batch_size and (not consecutive or chunks[-1][-1] == i - 1):
                chunks[-1].append(i)
            else:
                chunks.append([i])
        return chunks

    def _sampling_params(self, gen_kwargs: dict[str, Any] | None) -> SamplingParams:
        """lm_eval's generation kwargs as engine settings: greedy unless do_sample is true."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0) or 0.0) if do_sample else 0.0
        kw.pop("temperature", None)
        params = SamplingParams(
            max_new_tokens=int(kw.pop("max_gen_toks", self.max_gen_toks)), temperature=temperature,
            top_k=int(kw.pop("top_k", 0) or 0), top_p=float(kw.pop("top_p", 1.0) or 1.0), seed=self.seed,
            stop=tuple(s for s in until if s),
        )
        if kw:
            log.warning("simplegpt lm_eval adapter ignores generation settings %s", sorted(kw))
        return params


def main() -> None:
    """lm_eval's command line with the "simplegpt" model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
