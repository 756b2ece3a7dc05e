"""The model: GPT-2 by default, and the Llama-style options of one config on the same code.

GPT-2 is pre-LN transformer blocks, learned positions and a head tied to the token embedding.
GPTConfig's options change the block piece by piece (docs/architectures.md): rotary positions
(`positions="rotary"`, `rope_theta`), RMSNorm with or without a gain, a SwiGLU or ReLU^2 MLP of
`intermediate_size`, grouped-query attention (`n_kv_head` key/value heads), QK-norm, no biases and
an untied head. Llama, SmolLM2 and Qwen3 are such combinations; nanochat's block is another.
Every option keeps the GPT-2 module names (c_attn holds q|k|v, c_fc the MLP's input projection,
gate|up for SwiGLU), so one state-dict layout serves them all and GPT-2 checkpoints load as before.

The model knows nothing of files, tokenizers or the command line. Shapes use
B = batch, T = query length, S = key length, C = n_embd, H = n_head, K = n_kv_head, D = head size.
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
POSITIONS = ("learned", "rotary")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")


@dataclass
class GPTConfig:
    """Model shape and regularisation, with GPT-2's field names for GPT-2's fields and Hugging Face
    Llama's for the others. The defaults are GPT-2. ValueError for a bad value (TrainConfig makes it
    a ConfigError).

    n_kv_head: key/value heads (grouped-query attention; Hugging Face's num_key_value_heads);
    None = n_head. head_size: each head's width (Hugging Face's head_dim, which is this class's
    resolved property); None = n_embd // n_head. intermediate_size: the MLP's hidden width; None =
    4 * n_embd for gelu and relu2, and for swiglu 8/3 * n_embd rounded up to a multiple of 64 (the
    same parameters as a 4 * n_embd GELU MLP, as Llama does). norm_gain: the norms' learned scale
    (nanochat's RMSNorm has none). qk_norm: an RMSNorm over each head's queries and keys before
    the rotation (Qwen3). tie_word_embeddings: the output head is the token embedding.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5
    n_kv_head: int | None = None
    head_size: int | None = None
    positions: str = "learned"
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_gain: bool = True
    rms_norm_eps: float = 1e-6
    mlp: str = "gelu"
    intermediate_size: int | None = None
    qk_norm: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_kv_head", "head_size",
                     "intermediate_size"):
            value = getattr(self, name)
            if value is None and name in ("n_kv_head", "head_size", "intermediate_size"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.head_size is None and self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"allowed n_head values: {[h for h in range(1, min(self.n_embd, 4096) + 1) if self.n_embd % h == 0][:12]}..."
            )
        if self.n_head % self.kv_heads != 0:
            raise ValueError(f"GPTConfig.n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads}): "
                              f"each key/value head serves the same number of query heads; allowed n_kv_head values: "
                              f"{[k for k in range(1, self.n_head + 1) if self.n_head % k == 0]}")
        for name, choices in (("positions", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"GPTConfig.{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"GPTConfig.head_dim: rotary positions need an even head size, got {self.head_dim}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("layer_norm_epsilon", "rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"GPTConfig.{name} must be a number > 0, got {value!r}")
        for name in ("bias", "norm_gain", "qk_norm", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        """Each attention head's width D."""
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads K (n_head unless n_kv_head is set)."""
        return self.n_kv_head or self.n_head

    @property
    def ffn_size(self) -> int:
        """The MLP's hidden width (intermediate_size, or its default; see the class docstring)."""
        if self.intermediate_size:
            return self.intermediate_size
        if self.mlp == "swiglu":
            return math.ceil(8 * self.n_embd / 3 / 64) * 64
        return 4 * self.n_embd

    @property
    def is_gpt2(self) -> bool:
        """Whether every option is GPT-2's (biases may be off): the architecture of GPT2LMHeadModel
        and of the CPU kernels' fused GPT-2 paths."""
        return (self.positions == "learned" and self.norm == "layernorm" and self.norm_gain and self.mlp == "gelu"
                and self.kv_heads == self.n_head and self.head_dim * self.n_head == self.n_embd
                and self.ffn_size == 4 * self.n_embd and not self.qk_norm and self.tie_word_embeddings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        """The config of to_dict's dict; a dict without the newer keys (a GPT-2 checkpoint's) gets the defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)


# Size presets. The GPT-2 ones match the released checkpoints; the small ones train on a CPU.
# The llama-* family has the same sizes with the Llama block (LLAMA); smollm2-135m and qwen3-0.6b
# are those models' shapes (their Hugging Face config.json), for their weights or random ones.
LLAMA = dict(positions="rotary", norm="rmsnorm", mlp="swiglu", bias=False, rms_norm_eps=1e-5)
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=128),
    "mini": dict(n_layer=4, n_head=4, n_embd=128, n_positions=256),
    "small": dict(n_layer=6, n_head=6, n_embd=384, n_positions=256),
    "llama-tiny": dict(LLAMA, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, n_positions=128),
    "llama-mini": dict(LLAMA, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, n_positions=256),
    "llama-small": dict(LLAMA, n_layer=6, n_head=6, n_kv_head=2, n_embd=384, n_positions=256),
    "llama": dict(LLAMA, n_layer=12, n_head=12, n_kv_head=4, n_embd=768),
    "llama-medium": dict(LLAMA, n_layer=24, n_head=16, n_kv_head=4, n_embd=1024),
    "llama-large": dict(LLAMA, n_layer=36, n_head=20, n_kv_head=4, n_embd=1280),
    "llama-xl": dict(LLAMA, n_layer=48, n_head=25, n_kv_head=5, n_embd=1600),
    "smollm2-135m": dict(LLAMA, vocab_size=49152, n_positions=8192, n_embd=576, n_layer=30, n_head=9, n_kv_head=3,
                         intermediate_size=1536, rope_theta=100000.0),
    "qwen3-0.6b": dict(LLAMA, vocab_size=151936, n_positions=40960, n_embd=1024, n_layer=28, n_head=16,
                       n_kv_head=8, head_size=128, intermediate_size=3072, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, qk_norm=True),
}
PRESET_ALIASES = {"gpt2-124m": "gpt2", "gpt2-350m": "gpt2-medium", "gpt2-774m": "gpt2-large",
                  "gpt2-1.5b": "gpt2-xl", "llama-124m": "llama"}


def preset_config(name: str, **overrides) -> GPTConfig:
    """A GPTConfig from a named preset, with any field overridden. ValueError for an unknown name."""
    key = PRESET_ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return GPTConfig(**{**PRESETS[key], **overrides})


def norm_layer(config: GPTConfig, width: int | None = None) -> nn.Module:
    """The config's norm over the last `width` (default n_embd) features: LayerNorm (with a bias when
    config.bias) or RMSNorm, with a learned gain when config.norm_gain."""
    width = width or config.n_embd
    if config.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=config.rms_norm_eps, elementwise_affine=config.norm_gain)
    return nn.LayerNorm(width, eps=config.layer_norm_epsilon, elementwise_affine=config.norm_gain,
                        bias=config.bias and config.norm_gain)


def rotary_angles(config: GPTConfig, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles at position_ids (B or 1, T): each (B or 1, 1, T, D), float32.
    Channel i and i + D/2 of a head turn by the same angle position * rope_theta^(-2i/D)."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, device=position_ids.device).float() / D))  # (D/2,)
    angles = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, D)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (B, heads, T, D) rotated by rope's (cos, sin): each pair (x_i, x_{i+D/2}) turns by its angle."""
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        H, K, D = config.n_head, config.kv_heads, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, (H + 2 * K) * D, bias=config.bias)  # q | k | v
        self.c_proj = nn.Linear(H * D, config.n_embd, bias=config.bias)
        if config.qk_norm:  # normalises each head's D features, before the rotation
            self.q_norm = norm_layer(dataclasses.replace(config, norm="rmsnorm"), D)
            self.k_norm = norm_layer(dataclasses.replace(config, norm="rmsnorm"), D)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, kv: "LayerKV | None" = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, C); mask None or a boolean (B, 1, T, S) "may attend" mask; kv this layer's cache;
        rope the rotary (cos, sin) of the T positions (rotary_angles), None for learned positions."""
        qkv = self.c_attn(x)  # (B, T, (H + 2K) D): q | k | v, heads side by side
        return self.resid_dropout(self.c_proj(self.attend(qkv, mask, kv, rope)))

    def heads(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, D), k and v (B, K, T, D) from c_attn's output, QK-normed and rotated as configured."""
        B, T, _ = qkv.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = qkv.split([H * D, K * D, K * D], dim=2)
        q, k, v = q.view(B, T, H, D), k.view(B, T, K, D), v.view(B, T, K, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        return q, k, v

    def attend(self, qkv: torch.Tensor, mask: torch.Tensor | None, kv: "LayerKV | None",
               rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(D) + mask) v per head, each key/value head shared by H/K query heads:
        (B, T, (H + 2K) D) -> (B, T, H D), the input of c_proj."""
        B, T, _ = qkv.shape
        dropout_p = self.dropout if self.training else 0.0
        q, k, v = self.heads(qkv, rope)
        if kv is not None:
            k, v = kv.update(k, v)  # (B, K, S, D): the cached keys/values followed by these T
        gqa = self.n_kv_head != self.n_head
        if mask is None:
            # Without a mask the T queries are the last T of S keys and either T == S (causal)
            # or T == 1 (a decode step sees every cached key); GPT.forward builds a mask otherwise.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
        return y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)  # (B, T, H D)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        width = config.ffn_size
        # SwiGLU's gate and up projections are one matrix (gate rows first): one matmul instead of two.
        self.c_fc = nn.Linear(config.n_embd, 2 * width if self.kind == "swiglu" else width, bias=config.bias)
        # GPT-2 uses the tanh approximation of GELU; matching it keeps logits equal to GPT-2's.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, F), or (B, T, 2F) gate | up for SwiGLU
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = self.gelu(h)
        return self.dropout(self.c_proj(h))  # (B, T, F) -> (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm_layer(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, kv: "LayerKV | None" = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, kv, rope)
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
    """The language model of a GPTConfig (GPT-2 by default). forward(idx, targets=None,
    attention_mask=None, position_ids=None, kv_cache=None) -> (logits, loss)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT expects a GPTConfig, got {type(config).__name__}")
        self.config = config
        # forward checks its input's values (ids in the vocabulary, positions in the window), which
        # reads them on the host: a sync per call. Callers whose input is checked where it enters
        # (the engine, the trainer) turn this off, so the forward reads no tensor value.
        self.check_inputs = True
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.positions == "learned":
            modules["wpe"] = nn.Embedding(config.n_positions, config.n_embd)
        modules.update(drop=nn.Dropout(config.dropout), h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                       ln_f=norm_layer(config))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:  # the output head and the token embedding are one tensor
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
        """Parameter count; a tied head counts once. non_embedding drops the position table."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM appendix: 6N + 12·L·C·T."""
        cfg = self.config
        T = seq_len or cfg.n_positions
        return 6 * self.num_parameters(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak FLOP/s."""
        return self.flops_per_token(seq_len) * tokens_per_second / peak_flops

    @torch.no_grad()
    def crop_block_size(self, n_positions: int) -> None:
        """Shrink the context window (e.g. to fine-tune a 1024-token model at 256)."""
        if not 0 < n_positions <= self.config.n_positions:
            raise ValueError(f"n_positions must be in [1, {self.config.n_positions}], got {n_positions}")
        self.config = dataclasses.replace(self.config, n_positions=n_positions)
        if "wpe" not in self.transformer:
            return  # rotary positions have no table
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
        x = self.transformer.wte(idx.long())  # (B, T, C)
        rope = None
        if self.config.positions == "learned":
            x = x + self.transformer.wpe(position_ids)
        else:
            rope = rotary_angles(self.config, position_ids)
        x = self.transformer.drop(x)
        if kv_cache is None:
            for block in self.transformer.h:
                x = block(x, mask, None, rope)
        else:
            for block, kv in zip(self.transformer.h, kv_cache.layers):
                x = block(x, mask, kv, rope)
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
