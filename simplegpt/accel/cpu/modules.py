"""The training kernels applied to a plain model.GPT from outside, on modules that share its parameters.

    step_model = cpu.for_training(model)   # the same Parameter objects, kernels in the forward passes
    step_model.train()
    step_model.loss(idx, targets).backward()   # gradients land in model's parameters
    optimizer.step()                           # an optimizer over model.parameters()

`for_training` builds a twin of the model's module tree (simplegpt.views.module_view): new module
objects that hold the model's own Parameter and buffer objects (no copies of the weights, so
gradients and optimizer updates are shared, and the state_dict keys are the model's), with five
classes swapped in the twin only, each a subclass that runs a kernel where it applies and its
parent's forward otherwise:

    model.GPT                   -> loss(): the whole model and its loss in one call each way (model_loss)
    model.Block                 -> the whole block as one autograd node (training.block)
    model.CausalSelfAttention   -> attend(): causal attention from q|k|v (training.causal_attention)
    nn.LayerNorm                -> training.layer_norm
    nn.GELU(approximate="tanh") -> training.gelu

The caller's model is never changed. The twin has its own train()/eval() flag and hooks; a new
Parameter object given to the model later (crop_block_size, load_state_dict(assign=True)) is not
seen by a twin made before. Every kernel computes the same function as PyTorch's ops, in fewer
passes (docs/training.md); inputs a kernel does not take (GPUs, bf16, masks, KV caches, dropout,
head sizes it lacks) fall through to the parent class.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...model import GPT, Block, CausalSelfAttention
from ...views import module_view
from . import training
from .lib import load


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and training.usable(x):
            return training.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class GELU(nn.GELU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximate == "tanh" and training.usable(x):
            return training.gelu(x)
        return super().forward(x)


class Attention(CausalSelfAttention):
    def attend(self, qkv: torch.Tensor, mask: torch.Tensor | None, kv, rope=None) -> torch.Tensor:
        if (kv is None and mask is None and rope is None and not (self.training and self.dropout)
                and training.attention_usable(qkv, self.n_head)):
            return training.causal_attention(qkv, self.n_head)
        return super().attend(qkv, mask, kv, rope)


class FusedBlock(Block):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, kv=None, rope=None) -> torch.Tensor:
        if mask is None and kv is None and rope is None and training.block_usable(x, self):
            return training.block(x, self)
        return super().forward(x, mask, kv, rope)


class FusedGPT(GPT):
    def loss(self, idx: torch.Tensor, targets: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None and training.model_usable(self, idx, targets):
            if self.check_inputs:
                self.check_ids(idx)  # model_usable checked the shapes and the length
            return training.model_loss(self, idx, targets)
        return super().loss(idx, targets, attention_mask)


_SWAPS: dict[type, type] = {GPT: FusedGPT, Block: FusedBlock, CausalSelfAttention: Attention,
                            nn.LayerNorm: LayerNorm, nn.GELU: GELU}


def for_training(model: nn.Module) -> nn.Module:
    """The module a training step runs: a twin of model (see the module docstring) whose forward
    passes take the CPU training kernels, or model itself where none can apply (the kernels are
    switched off or cannot load, a parameter is not on the CPU, or model is not exactly a model.GPT of the
    GPT-2 architecture: GPTConfig.is_gpt2).

    Call train()/eval() and loss()/forward() on what this returns; optimize and save model."""
    if (type(model) is not GPT or not model.config.is_gpt2 or load() is None
            or any(p.device.type != "cpu" for p in model.parameters())):
        return model
    return module_view(model, lambda m: _SWAPS.get(type(m)))
