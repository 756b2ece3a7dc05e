"""The training kernels applied to a plain model.GPT from outside, on modules that share its parameters.

    step_model = cpu.for_training(model)   # the same Parameter objects, kernels in the forward passes
    step_model.train()
    step_model.loss(idx, targets).backward()   # gradients land in model's parameters
    optimizer.step()                           # an optimizer over model.parameters()

`for_training` builds a twin of the model's module tree (simplegpt.views.module_view): new module
objects that hold the model's own Parameter and buffer objects (no copies of the weights, so
gradients and optimizer updates are shared, and the state_dict keys are the model's), with
classes swapped in the twin only, each a subclass that runs a kernel where it applies and its
parent's forward otherwise. A GPT-2 model (GPTConfig.is_gpt2) takes the fused GPT-2 kernels:

    model.GPT                   -> loss(): the whole model and its loss in one call each way (model_loss)
    model.Block                 -> the whole block as one autograd node (training.block)
    model.CausalSelfAttention   -> attend(): causal attention from q|k|v (training.causal_attention)
    nn.LayerNorm                -> training.layer_norm
    nn.GELU(approximate="tanh") -> training.gelu

and a model with other options (Llama-style blocks) the whole-model pass of llama_model, else the
single ops of llama_ops:

    model.GPT                   -> loss(): the whole model and its loss in one call each way
                                   (llama_model.loss; the options it takes: llama_model's docstring)
    model.CausalSelfAttention   -> attend(): QK-norm, rotary positions and causal grouped-query
                                   attention from c_attn's q|k|v output in one autograd node
                                   (llama_ops.qkv_attention), one gradient tensor back to it;
                                   heads(): rotary positions (llama_ops.rope) where a mask or a
                                   KV cache keeps PyTorch's attention
    model.MLP                   -> SwiGLU from c_fc's gate|up output with one gradient tensor
                                   (llama_ops.swiglu_fused), or ReLU^2 (llama_ops.relu2)
    nn.RMSNorm                  -> llama_ops.rms_norm (the block's norms and ln_f)
    nn.LayerNorm, nn.GELU       -> as above

The caller's model is never changed. The twin has its own train()/eval() flag and hooks; a new
Parameter object given to the model later (crop_block_size, load_state_dict(assign=True)) is not
seen by a twin made before. Every kernel computes the same function as PyTorch's ops, in fewer
passes (docs/training.md); inputs a kernel does not take (GPUs, bf16, masks, KV caches, dropout,
head sizes it lacks) fall through to the parent class. A block whose linear layers carry adapters
(LoRA) keeps model.Block's forward, and then the model keeps GPT's loss(): the attention, LayerNorm
and GELU kernels still apply inside it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...model import GPT, MLP, Block, CausalSelfAttention
from ...views import module_view
from . import llama_model, llama_ops, training
from .lib import load
from .slots import BLOCK_SLOTS


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


class RMSNorm(nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) == 1 and self.eps is not None and llama_ops.usable(x):
            return llama_ops.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class LlamaMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gelu" or not llama_ops.usable(x):
            return super().forward(x)
        h = self.c_fc(x)  # (B, T, 2F) gate | up for SwiGLU, else (B, T, F)
        h = llama_ops.swiglu_fused(h) if self.kind == "swiglu" else llama_ops.relu2(h)
        return self.dropout(self.c_proj(h))


class LlamaAttention(CausalSelfAttention):
    def heads(self, qkv: torch.Tensor, rope=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # the path with a mask or a KV cache: rotary positions on the kernel, the rest in PyTorch
        if rope is None or not llama_ops.usable(qkv, *rope):
            return super().heads(qkv, rope)
        q, k, v = super().heads(qkv, None)  # QK-normed, not yet rotated
        cos, sin = (t[:, 0] for t in rope)  # (B or 1, 1, T, D) -> (B or 1, T, D): both halves equal
        return llama_ops.rope(q, cos, sin), llama_ops.rope(k, cos, sin), v

    def attend(self, qkv: torch.Tensor, mask: torch.Tensor | None, kv, rope=None) -> torch.Tensor:
        B, T, _ = qkv.shape
        # QK-norm's two RMSNorms take the config's one eps (model.norm_layer); None is PyTorch's default
        qk_norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if hasattr(self, "q_norm") else None
        if (kv is None and mask is None and not (self.training and self.dropout)
                and (qk_norm is None or qk_norm[2] is not None)
                and llama_ops.qkv_attention_usable(qkv, self.n_head, self.n_kv_head)
                and (rope is None or llama_ops.usable(*rope))):
            if rope is not None:
                rope = tuple(t[:, 0] for t in rope)  # (B or 1, 1, T, D) -> (B or 1, T, D): both halves equal
            y = llama_ops.qkv_attention(qkv, self.n_head, self.n_kv_head, rope, qk_norm)  # (B, H, T, D)
            return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # a view: (B, T, H, D) memory
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


class LlamaGPT(GPT):
    def loss(self, idx: torch.Tensor, targets: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None and llama_model.usable(self, idx, targets):
            if self.check_inputs:
                self.check_ids(idx)  # usable checked the shapes and the length
            return llama_model.loss(self, idx, targets)
        return super().loss(idx, targets, attention_mask)


_GPT2_SWAPS: dict[type, type] = {GPT: FusedGPT, Block: FusedBlock, CausalSelfAttention: Attention,
                                 nn.LayerNorm: LayerNorm, nn.GELU: GELU}
# The fused GPT-2 model and block would misread other blocks: those take the single ops.
_OTHER_SWAPS: dict[type, type] = {GPT: LlamaGPT, CausalSelfAttention: LlamaAttention, MLP: LlamaMLP, nn.RMSNorm: RMSNorm,
                                  nn.LayerNorm: LayerNorm, nn.GELU: GELU}


def _plain_block(block: nn.Module) -> bool:
    """Whether each of the block's BLOCK_SLOTS is its module's own parameter: a layer wrapped by an
    adapter (peft's LoRA, simplegpt.training.lora) computes more than its weight, which the fused
    kernels would read alone, so such a block runs PyTorch's forward."""
    return all(name in block.get_submodule(path)._parameters for path, name in BLOCK_SLOTS)


def _swap(module: nn.Module, swaps: dict[type, type]) -> type | None:
    cls = swaps.get(type(module))
    if cls is FusedBlock and not _plain_block(module):
        return None
    if cls is FusedGPT and not all(_plain_block(block) for block in module.transformer.h):
        return None
    if cls is LlamaGPT and not all(llama_model.plain_block(block) for block in module.transformer.h):
        return None
    return cls


def for_training(model: nn.Module) -> nn.Module:
    """The module a training step runs: a twin of model (see the module docstring) whose forward
    passes take the CPU training kernels, or model itself where none can apply (the kernels are
    switched off or cannot load, a parameter is not on the CPU, or model is not exactly a model.GPT).

    Call train()/eval() and loss()/forward() on what this returns; optimize and save model."""
    if type(model) is not GPT or load() is None or any(p.device.type != "cpu" for p in model.parameters()):
        return model
    swaps = _GPT2_SWAPS if model.config.is_gpt2 else _OTHER_SWAPS
    return module_view(model, lambda m: _swap(m, swaps))
