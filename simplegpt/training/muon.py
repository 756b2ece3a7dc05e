"""Muon for the hidden weight matrices, AdamW for the rest: the `optimizer = "muon"` of a run.

The recipe is Keller Jordan's (Muon: An optimizer for hidden layers in neural networks, 2024,
kellerjordan.github.io/posts/muon): Muon -- SGD with Nesterov momentum 0.95 whose update is
orthogonalized by 5 Newton-Schulz iterations -- for the 2-D weight matrices of the transformer
blocks, and AdamW for everything else: the token and position embeddings, the output head (here
tied to the token embedding), the LayerNorm gains and all biases. The Muon step is PyTorch's
torch.optim.Muon (torch >= 2.9) with adjust_lr_fn="match_rms_adamw" (Moonshot AI's scaling, "Muon is
Scalable for LLM Training", 2025): its update has AdamW's RMS, so both halves follow the run's one
lr and its schedule (the AdamW half at cfg.adamw_lr_ratio times it, 1 by default), and weight_decay
applies to the matrices of both. cfg.muon_momentum is the Nesterov momentum (the recipe's 0.95). The
fused attention matrix (c_attn, Q, K and V stacked) is orthogonalized as one matrix.

Where the run splits each batch over CPU cores (training/core_shards.py), the Muon step is split too:
two torch.optim.Muon over halves of the matrices (balanced by their Newton-Schulz FLOPs), one stepped
on the calling thread and one beside it on the core-shards worker, each computing exactly what the
one optimizer computes for its matrices (Muon updates each matrix on its own), over the one
optimizer's state and hyperparameters: the same weights bit for bit, and the same state_dict.

Muon needs each whole matrix on the rank that updates it: under DDP every rank holds the whole
model and all-reduced gradients, so it runs there as in one process; FSDP2 shards matrices by rows
and refuses it (simplegpt.training.ways.fsdp2).
"""

from __future__ import annotations

import math
from concurrent.futures import Future, wait
from typing import Any, Callable

import torch
import torch.nn as nn

from ..config import TrainConfig


def muon_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool) -> tuple[list[dict], list[dict]]:
    """(Muon's parameter groups, AdamW's) as the recipe splits model: the 2-D weights inside the
    transformer blocks go to Muon; embeddings (and the head tied to them), LayerNorm gains and biases
    to AdamW, the embeddings decayed only when decay_embeddings."""
    blocks = {id(p) for block in model.transformer.h for p in block.parameters() if p.dim() == 2}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden, decayed, undecayed = [], [], []
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        if id(p) in blocks:
            hidden.append(p)
        elif p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings):
            decayed.append(p)  # a 2-D weight outside the blocks that is not an embedding: an untied head
        else:
            undecayed.append(p)
    adamw = [{"params": decayed, "weight_decay": weight_decay}, {"params": undecayed, "weight_decay": 0.0}]
    return [{"params": hidden, "weight_decay": weight_decay}], [g for g in adamw if g["params"]]


def muon_adamw_groups(model: nn.Module, cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """muon_groups for cfg, the AdamW groups carrying "lr_ratio" = cfg.adamw_lr_ratio: the training loop
    sets each group's lr to the schedule's times its lr_ratio (modded-nanogpt's higher lr for the
    embeddings and head than for the hidden matrices)."""
    hidden, adamw = muon_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    return hidden, [{**g, "lr_ratio": cfg.adamw_lr_ratio} for g in adamw]


class MuonAdamW:
    """torch.optim.Muon and torch.optim.AdamW over the recipe's parameter groups, as one optimizer:
    param_groups (Muon's, then AdamW's), zero_grad, clip_and_step, and a state_dict in torch's
    shape ({"state", "param_groups"}, the parameters numbered across both) that load_state_dict reads back."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, scaler: torch.amp.GradScaler):
        muon_params, adamw_params = muon_adamw_groups(model, cfg)
        self.muon = torch.optim.Muon(muon_params, lr=cfg.lr, momentum=cfg.muon_momentum, nesterov=True,
                                     adjust_lr_fn="match_rms_adamw")
        fused = {"fused": True} if cfg.fused and device.type in ("cuda", "cpu") else {}
        self.adamw = torch.optim.AdamW(adamw_params, lr=cfg.lr * cfg.adamw_lr_ratio, betas=(cfg.beta1, cfg.beta2), **fused)
        self.scaler = scaler
        self._muon_count = sum(len(g["params"]) for g in self.muon.param_groups)
        self._params = [p for opt in (self.muon, self.adamw) for g in opt.param_groups for p in g["params"]]
        self._halves: list[torch.optim.Muon] | None = None  # made at the first step split in two

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.muon.param_groups + self.adamw.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def clip_and_step(self, max_norm: float, beside: Callable[[Callable[[], Any]], Future] | None = None) -> float:
        """Unscale, clip the total gradient norm of both halves to max_norm (when > 0), step both (the
        scaler skips a non-finite fp16 step) and update the scale. Returns the norm (NaN when not
        clipping); a non-finite norm without a scaler is returned without a step.

        beside(fn) -> a Future of fn() run on another thread (one torch thread, as the caller's): Muon's
        step then runs for half of the matrices and AdamW's there while this thread steps the other half
        (the same results; not under an active fp16 scaler, whose bookkeeping is per optimizer)."""
        norm = math.nan
        if max_norm > 0:
            for opt in (self.muon, self.adamw):
                self.scaler.unscale_(opt)
            norm = float(torch.nn.utils.clip_grad_norm_(self._params, max_norm))
            if not math.isfinite(norm) and not self.scaler.is_enabled():
                return norm
        halves = self._split() if beside is not None and not self.scaler.is_enabled() else None
        if halves is None:
            for opt in (self.muon, self.adamw):
                self.scaler.step(opt)
        else:
            # the halves are balanced with the first one the heavier: AdamW's small step goes with the second
            job = beside(lambda: (halves[1].step(), self.adamw.step()))
            try:
                halves[0].step()
            finally:
                wait([job])  # the other half's update is done (or failed) before anything else runs
            job.result()
        self.scaler.update()
        return norm

    def _split(self) -> list[torch.optim.Muon] | None:
        """Two torch.optim.Muon over halves of Muon's matrices, each matrix in its own group's copy, with
        the groups' settings as they are now and Muon's own state (one dict, keyed by parameter); None
        with fewer than 2 matrices. The halves are balanced by each matrix's Newton-Schulz work, m x m x
        (2n + m) multiply-adds per iteration for an m x n matrix (m <= n), the first the heavier."""
        if self._halves is None:
            if self._muon_count < 2:
                return None
            cost = lambda p: min(p.shape) ** 2 * (2 * max(p.shape) + min(p.shape))  # noqa: E731
            groups = self.muon.param_groups
            parts: list[list[list]] = [[[] for _ in groups] for _ in range(2)]  # [half][group]: matrices
            work = [0, 0]
            mats = sorted(((p, g) for g, group in enumerate(groups) for p in group["params"]),
                          key=lambda pg: cost(pg[0]), reverse=True)
            for p, g in mats:  # largest first, each to the lighter half
                lighter = 0 if work[0] <= work[1] else 1
                parts[lighter][g].append(p)
                work[lighter] += cost(p)
            self._halves = [torch.optim.Muon([{**group, "params": part[g]} for g, group in enumerate(groups)])
                            for part in parts]
        for half in self._halves:
            half.state = self.muon.state  # load_state_dict replaces Muon's state dict: follow it
            for mine, group in zip(half.param_groups, self.muon.param_groups):
                mine.update((k, v) for k, v in group.items() if k != "params")  # lr: the schedule sets it each step
        return self._halves

    def state_dict(self) -> dict[str, Any]:
        muon, adamw = self.muon.state_dict(), self.adamw.state_dict()
        shift = self._muon_count
        # in parameter order: a step split over two threads fills Muon's state in the order they ran
        state = {**dict(sorted(muon["state"].items())), **{i + shift: s for i, s in adamw["state"].items()}}
        groups = [{**g, "optimizer": "muon"} for g in muon["param_groups"]]
        groups += [{**g, "params": [i + shift for i in g["params"]], "optimizer": "adamw"}
                   for g in adamw["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a state_dict() of a MuonAdamW over the same parameters; ValueError when it is not one."""
        groups = state["param_groups"]
        kinds = [g.get("optimizer") for g in groups]
        if kinds != ["muon"] * len(self.muon.param_groups) + ["adamw"] * len(self.adamw.param_groups):
            raise ValueError(f"it holds the parameter groups of another optimizer ({kinds}), not Muon's and AdamW's")
        shift = self._muon_count
        strip = lambda g: {k: v for k, v in g.items() if k != "optimizer"}  # noqa: E731
        muon_groups_, adamw_groups = groups[:len(self.muon.param_groups)], groups[len(self.muon.param_groups):]
        self.muon.load_state_dict({"state": {i: s for i, s in state["state"].items() if i < shift},
                                   "param_groups": [strip(g) for g in muon_groups_]})
        self.adamw.load_state_dict({"state": {i - shift: s for i, s in state["state"].items() if i >= shift},
                                    "param_groups": [{**strip(g), "params": [i - shift for i in g["params"]]}
                                                     for g in adamw_groups]})
