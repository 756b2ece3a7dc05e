"""The CPU kernels: small C kernels for the hot paths of decoding and training on x86-64 CPUs.

    from simplegpt.accel import cpu
    cpu.enabled()            # whether the kernels are in use here
    with cpu.disabled():     # PyTorch's kernels only, as SIMPLEGPT_NATIVE=0 does for a whole process
        ...

`lib` compiles and loads the library; `decode` has the decoding kernels (used by the engine's
native backend); `training` the autograd functions and AdamW step used by training.
"""

from .lib import MAX_INT8_IN, MAX_ROWS, disabled, enabled, load, unavailable_reason
from .modules import for_training
from .slots import BLOCK_SLOTS

__all__ = ["BLOCK_SLOTS", "MAX_INT8_IN", "MAX_ROWS", "disabled", "enabled", "for_training", "load",
           "unavailable_reason"]
