"""Text generation, by job:

- sampling.py: SamplingParams and the one sampling function (sample_next_token);
- text.py: UTF-8-safe text pieces with stop strings, Result, Stream and TextStream;
- cache.py: the KV cache;
- backend.py (eager), native.py (the CPU kernels), compiled.py (torch.compile): the decode
  backends behind one interface;
- engine.py: the Engine, which picks its backend once and runs one decode loop over it.

`simplegpt.engine` re-exports the public names.
"""

from .cache import KVCache
from .engine import Engine, generate_ids
from .sampling import (MAX_LOGPROBS, SamplingParams, TokenLogprobs, apply_repetition_penalty, sample_next_token,
                       sampling_probs, token_logprobs)
from .text import FINISH_LENGTH, FINISH_STOP, Result, Stream, TextStream

__all__ = ["FINISH_LENGTH", "FINISH_STOP", "MAX_LOGPROBS", "Engine", "KVCache", "Result", "SamplingParams", "Stream",
           "TextStream", "TokenLogprobs", "apply_repetition_penalty", "generate_ids", "sample_next_token",
           "sampling_probs", "token_logprobs"]
