"""Views of a module tree: new module objects over the same parameters, for code that must not change
a model it was handed but wants other module classes or another train/eval mode.

The engine's backends run such a view in eval mode (simplegpt.generation.backend), and the CPU
training kernels run one whose classes call the kernels (simplegpt.accel.cpu.for_training).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch.nn as nn


def module_view(module: nn.Module, swap: Callable[[nn.Module], type | None] | None = None,
                training: bool | None = None) -> nn.Module:
    """A new module tree over `module`'s Parameter and buffer objects and attributes.

    Every module object is new (one shared in `module`, such as a tied layer, is shared in the view
    too), with its own dicts of parameters, buffers, submodules and hooks, holding the same values:
    no weight is copied, so the view reads what the model holds now (including later in-place
    updates such as optimizer steps) and gradients computed through it land in the model's
    parameters. swap(m) may return a subclass of type(m) for the view's object to take (a module
    that calls a kernel); training, when given, is the view's mode. `module` is not changed in any
    way; a Parameter object given to it later (crop_block_size) is not seen by a view made before.
    """
    memo: dict[int, nn.Module] = {}

    def view(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        new = object.__new__(type(m))
        new.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in vars(m).items()})
        memo[id(m)] = new
        new._modules = {name: None if child is None else view(child) for name, child in m._modules.items()}
        if training is not None:
            new.training = training
        cls = swap(m) if swap is not None else None
        if cls is not None:
            new.__class__ = cls
        return new

    return view(module)
