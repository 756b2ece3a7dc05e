"""Text generation's public names, in the place users import them from (see simplegpt/generation/).

    from simplegpt.engine import Engine, SamplingParams
    engine = Engine(model, tokenizer)
    [result] = engine.generate(["Once upon a time"], SamplingParams(max_new_tokens=50, temperature=0.8))
"""

from .generation import (FINISH_LENGTH, FINISH_STOP, MAX_LOGPROBS, Engine, KVCache, Result, SamplingParams, Stream,
                         TextStream, TokenLogprobs, apply_repetition_penalty, generate_ids, sample_next_token,
                         sampling_probs, token_logprobs)
from .generation.layout import use_gemv_layout

__all__ = ["FINISH_LENGTH", "FINISH_STOP", "MAX_LOGPROBS", "Engine", "KVCache", "Result", "SamplingParams", "Stream",
           "TextStream", "TokenLogprobs", "apply_repetition_penalty", "generate_ids", "sample_next_token",
           "sampling_probs", "token_logprobs", "use_gemv_layout"]
