"""GPT-2 architecture: pre-LN transformer blocks, learned positions, tied output head.

The model knows nothing of files, tokenizers or the command line. Shapes use
B = batch, T = query length, S = key length, C = n_embd, H = n_head, D = head size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # a label that takes no loss (F.cross_entropy's default ignore_index)


@dataclass
class GPTConfig:
    """Model shape and regularisation, with GPT-2's field names."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"allowed n_head values: {[h for h in range(1, min(self.n_embd, 4096) + 1) if self.n_embd % h == 0][:12]}..."
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"GPTConfig.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)


# Size presets. The GPT-2 ones match the released checkpoints; the small ones train on a CPU.
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=128),
    "mini": dict(n_layer=4, n_head=4, n_embd=128, n_positions=256),
    "small": dict(n_layer=6, n_head=6, n_embd=384, n_positions=256),
}
PRESET_ALIASES = {"gpt2-124m": "gpt2", "gpt2-350m": "gpt2-medium", "gpt2-774m": "gpt2-large",
                  "gpt2-1.5b": "gpt2-xl"}


def preset_config(name: str, **overrides) -> GPTConfig:
    """A GPTConfig from a named preset, with any field overridden."""
    key = PRESET_ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return GPTConfig(**{**PRESETS[key], **overrides})


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, kv: "LayerKV | None" = None) -> torch.Tensor:
        """x (B, T, C); mask None or a boolean (B, 1, T, S) "may attend" mask; kv this layer's cache."""
        qkv = self.c_attn(x)  # (B, T, 3C): q | k | v, heads side by side
        return self.resid_dropout(self.c_proj(self.attend(qkv, mask, kv)))

    def attend(self, qkv: torch.Tensor, mask: torch.Tensor | None, kv: "LayerKV | None") -> torch.Tensor:
        """softmax(q k^T / sqrt(D) + mask) v per head: (B, T, 3C) -> (B, T, C), the input of c_proj."""
        B, T, C3 = qkv.shape
        C = C3 // 3
        dropout_p = self.dropout if self.training else 0.0
        q, k, v = qkv.split(C, dim=2)
        # (B, T, C) -> (B, H, T, D)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if kv is not None:
            k, v = kv.update(k, v)  # (B, H, S, D): the cached keys/values followed by these T
        if mask is None:
            # Without a mask the T queries are the last T of S keys and either T == S (causal)
            # or T == 1 (a decode step sees every cached key); GPT.forward builds a mask otherwise.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 uses the tanh approximation of GELU; matching it keeps logits equal to GPT-2's.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, kv: "LayerKV | None" = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, kv)
        x = x + self.mlp(self.ln_2(x))
        return x


def build_attention_mask(attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """Combine the causal mask with a key-padding mask into a boolean (B, 1, T, S) mask.

    attention_mask: (B, S), 1 for real tokens and 0 for padding; the T queries are the last T
    of the S keys. True means "may attend". Every query may always attend to itself, so a padding
    query (which nobody reads) never sees an all-masked row and never produces NaN.
    """
    S = attention_mask.size(1)
    q_pos = torch.arange(S - query_len, S, device=attention_mask.device)
    k_pos = torch.arange(S, device=attention_mask.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    keep = causal[None] & attention_mask.bool()[:, None, :]  # (B, T, S)
    keep = keep | (k_pos[None, :] == q_pos[:, None])[None]
    return keep[:, None]  # (B, 1, T, S)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class GPT(nn.Module):
    """GPT-2 language model. forward(idx, targets=None, attention_mask=None, position_ids=None,
    kv_cache=None) -> (logits, loss)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT expects a GPTConfig, got {type(config).__name__}")
        self.config = config
        # forward checks its input's values (ids in the vocabulary, positions in the window), which
        # reads them on the host: a sync per call. Callers whose input is checked where it enters
        # (the engine, the trainer) turn this off, so the forward reads no tensor value.
        self.check_inputs = True
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the output head and the token embedding are one tensor.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): two residual adds per block.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count; the tied head counts once. non_embedding drops the position table."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM appendix: 6N + 12·L·C·T."""
        cfg = self.config
        T = seq_len or cfg.n_positions
        return 6 * self.num_parameters(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak FLOP/s."""
        return self.flops_per_token(seq_len) * tokens_per_second / peak_flops

    @torch.no_grad()
    def crop_block_size(self, n_positions: int) -> None:
        """Shrink the context window (e.g. to fine-tune a 1024-token model at 256)."""
        if not 0 < n_positions <= self.config.n_positions:
            raise ValueError(f"n_positions must be in [1, {self.config.n_positions}], got {n_positions}")
        self.config = dataclasses.replace(self.config, n_positions=n_positions)
        wpe = self.transformer.wpe
        wpe.weight = nn.Parameter(wpe.weight[:n_positions].clone())
        wpe.num_embeddings = n_positions

    def check_input(self, idx: torch.Tensor, position_ids: torch.Tensor) -> None:
        """ValueError unless idx (B, T) holds integer ids in 0..vocab_size-1 and every position id
        (B, T) is below n_positions. It reads the tensors' values on the host; forward calls it
        while check_inputs is True."""
        if position_ids.numel() and int(position_ids.max()) >= self.config.n_positions:
            raise ValueError(
                f"sequence of length {int(position_ids.max()) + 1} exceeds n_positions="
                f"{self.config.n_positions}; crop the input to the last {self.config.n_positions} tokens"
            )
        self.check_ids(idx)

    def check_ids(self, idx: torch.Tensor) -> None:
        """ValueError unless idx holds integer token ids in 0..vocab_size-1 (reads them on the host)."""
        if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} out of range: allowed ids are 0..{self.config.vocab_size - 1}")

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: "KVCacheLike | None" = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids; targets (B, T) next-token ids with IGNORE_INDEX where no loss;
        attention_mask 1 = real token, 0 = padding; position_ids (B, T). Returns logits (B, T, V) and the loss.

        Without kv_cache this is the reference path: attention_mask is (B, T). With kv_cache
        (simplegpt.engine.KVCache) idx holds the T tokens that follow the kv_cache.length cached
        ones, their keys and values are written into the cache, and attention_mask, if given,
        covers all S = kv_cache.length + T keys: (B, S). attention_mask may instead be a boolean
        (B, 1, T, S) "may attend" mask, used as it is (the compiled engine's static cache).
        ValueError for a bad shape and, while check_inputs is True, for ids or positions out of
        range (check_input).
        """
        x = self.hidden_states(idx, attention_mask, position_ids, kv_cache)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)).float(), targets.reshape(-1).long(), ignore_index=IGNORE_INDEX
            )
        return logits, loss

    def loss(self, idx: torch.Tensor, targets: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The mean cross-entropy loss of forward(idx, targets, attention_mask): a scalar tensor.
        Accelerators override this one method to compute a training step's loss without the
        logits (simplegpt.accel.cpu.for_training)."""
        return self(idx, targets, attention_mask=attention_mask)[1]

    def hidden_states(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: "KVCacheLike | None" = None,
    ) -> torch.Tensor:
        """The final-layer-norm output (B, T, C), before the output head; arguments as in forward."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, seq_len), got {tuple(idx.shape)}")
        B, T = idx.shape
        if T == 0:
            raise ValueError("idx is empty: give at least one token")
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=idx.device)[None]
        if self.check_inputs:
            self.check_input(idx, position_ids)
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask  # built by the caller, e.g. over a static cache's slots
        elif attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                want = (f"idx shape {tuple(idx.shape)}" if kv_cache is None
                        else f"(batch, cached + new tokens) {(B, past + T)}")
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal {want}")
            mask = build_attention_mask(attention_mask, T)
        elif past and T > 1:
            # New tokens after cached ones need an explicit causal mask over all S keys.
            mask = build_attention_mask(torch.ones(B, past + T, dtype=torch.bool, device=idx.device), T)
        x = self.transformer.wte(idx.long()) + self.transformer.wpe(position_ids)  # (B, T, C)
        x = self.transformer.drop(x)
        if kv_cache is None:
            for block in self.transformer.h:
                x = block(x, mask)
        else:
            for block, kv in zip(self.transformer.h, kv_cache.layers):
                x = block(x, mask, kv)
            kv_cache.advance(T)
        return self.transformer.ln_f(x)


class LayerKV(Protocol):
    """One layer's slice of a KV cache: stores the new (B, H, T, D) keys/values, returns all (B, H, S, D)."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class KVCacheLike(Protocol):
    """What GPT.forward needs of a cache (simplegpt.engine.KVCache implements it)."""

    length: int
    layers: Sequence[LayerKV]

    def advance(self, n: int) -> None: ...
