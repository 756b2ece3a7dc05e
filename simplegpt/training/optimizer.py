"""The optimizer: a registry of factories (cfg.optimizer picks one), AdamW over decayed and
undecayed parameter groups, its clipped step, and the learning-rate schedule.

What the training loop asks of an optimizer: param_groups (it sets each group's "lr" every step),
zero_grad(set_to_none=True), state_dict()/load_state_dict() in torch's shape (exact resume), and
clip_and_step(max_norm) -> the gradient norm (a non-finite norm leaves the weights as they were).
AdamW's is a torch.optim.AdamW with that method: on a CPU the native one
(simplegpt.accel.cpu.optim.AdamW: clipping and update in two passes of the kernels, PyTorch's ops
where they do not apply), elsewhere PyTorch's through the run's GradScaler. Muon's is
simplegpt.training.muon.MuonAdamW. A new optimizer is a factory with make_adamw's signature and a
line in OPTIMIZERS (and its name among the choices of the `optimizer` key).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from ..accel.cpu.optim import AdamW as NativeAdamW
from ..config import TrainConfig


class ScaledAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose clip_and_step goes through a GradScaler (a no-op one unless fp16)."""

    def __init__(self, params, scaler: torch.amp.GradScaler, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.scaler = scaler

    def clip_and_step(self, max_norm: float) -> float:
        """Unscale the gradients, clip their total norm to max_norm (when > 0), step (skipped by the
        scaler when a gradient is not finite) and update the scale. Returns the norm, NaN when not clipping.
        A non-finite norm is never applied: under fp16 the scaler skips the step and lowers its scale;
        without a scaler the step is not taken (the caller sees the norm)."""
        norm = math.nan
        if max_norm > 0:
            self.scaler.unscale_(self)
            params = [p for group in self.param_groups for p in group["params"]]
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if not math.isfinite(norm) and not self.scaler.is_enabled():
                return norm
        self.scaler.step(self)
        self.scaler.update()
        return norm


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool) -> list[dict]:
    """Decay only matrices of Linear layers (and embeddings if asked); never biases or norms."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # the token rows a LoRA run trains (peft's trainable tokens: simplegpt.training.lora) are embedding rows
    embeddings |= {id(p) for name, p in model.named_parameters() if "trainable_tokens_delta" in name}
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        is_embedding = id(p) in embeddings
        (decay if p.dim() >= 2 and (decay_embeddings or not is_embedding) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# Devices whose AdamW has a fused kernel in every torch simplegpt supports (>= 2.4): CUDA (since 2.0), CPU (2.4).
FUSED_DEVICES = ("cuda", "cpu")


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device, scaler: torch.amp.GradScaler) -> Any:
    """The optimizer cfg.optimizer names, over model's parameters (see the module docstring)."""
    return OPTIMIZERS[cfg.optimizer](model, cfg, device, scaler)


def make_adamw(model: nn.Module, cfg: TrainConfig, device: torch.device,
               scaler: torch.amp.GradScaler) -> NativeAdamW | ScaledAdamW:
    """The run's AdamW over model's parameters. With cfg.fused: on CUDA, PyTorch's fused kernel
    (fused=True: the whole update in multi-tensor kernels, with bf16 autocast's float32 weights
    or an fp16 run's GradScaler, whose scale and inf check the kernel applies itself); on a CPU the
    native step over PyTorch's fused CPU AdamW (never under an active scaler: fp16 is CUDA-only).
    Elsewhere, or without cfg.fused, PyTorch's default (foreach) AdamW.

    PyTorch checks a fused optimizer's devices and dtypes at its first step, not here, so the device
    is checked before asking for it."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    native = cfg.fused and device.type == "cpu" and not scaler.is_enabled()
    make = NativeAdamW if native else functools.partial(ScaledAdamW, scaler=scaler)
    if cfg.fused and device.type in FUSED_DEVICES:
        kwargs["fused"] = True
    return make(groups, **kwargs)


def make_muon(model: nn.Module, cfg: TrainConfig, device: torch.device, scaler: torch.amp.GradScaler) -> Any:
    """Muon for the blocks' weight matrices, AdamW for the rest (simplegpt.training.muon)."""
    from .muon import MuonAdamW

    return MuonAdamW(model, cfg, device, scaler)


OPTIMIZERS: dict[str, Callable[[nn.Module, TrainConfig, torch.device, torch.amp.GradScaler], Any]] = {
    "adamw": make_adamw,
    "muon": make_muon,
}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine / wsd / constant;
    the last step (max_iters - 1) runs at min_lr."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if cfg.schedule == "constant":
        return cfg.lr
    if step >= cfg.max_iters - 1:  # also where the decay is one step long, which the formulas below start at lr
        return cfg.min_lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(cfg.max_iters * cfg.decay_fraction))
        decay_start = max(cfg.warmup_iters, cfg.max_iters - decay_steps)
        if step < decay_start:
            return cfg.lr
        frac = min(1.0, (step - decay_start) / max(1, cfg.max_iters - 1 - decay_start))
        return cfg.lr + frac * (cfg.min_lr - cfg.lr)
    frac = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - 1 - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)


def lr_at_fraction(fraction: float, cfg: TrainConfig) -> float:
    """Learning rate of a time-budgeted run's step that ends at `fraction` (0..1) of the budget
    (cfg.max_time): linear warmup over the first cfg.warmup_fraction, then cosine / wsd / constant as
    lr_at; the step that ends the budget (fraction 1) runs at min_lr (cosine, wsd). The wsd schedule
    (warmup, a stable phase at lr, a linear decay over the last decay_fraction) is the
    warmup-stable-decay of MiniCPM (Hu et al. 2024, arXiv:2404.06395), which Hägele et al. 2024
    (arXiv:2405.18392) find as good as cosine at every length: the schedule of a run whose length is a
    budget rather than a count of steps."""
    fraction = min(max(fraction, 0.0), 1.0)
    if fraction < cfg.warmup_fraction:
        return cfg.lr * fraction / cfg.warmup_fraction
    if cfg.schedule == "constant":
        return cfg.lr
    if fraction == 1.0:  # exactly: the budget's last step
        return cfg.min_lr
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_fraction, 1.0 - cfg.decay_fraction)
        if fraction <= decay_start:
            return cfg.lr
        return cfg.lr + (fraction - decay_start) / (1.0 - decay_start) * (cfg.min_lr - cfg.lr)
    frac = (fraction - cfg.warmup_fraction) / (1.0 - cfg.warmup_fraction)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)
