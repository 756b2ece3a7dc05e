"""Decoding kernels: matrix-vector products over all cores (csrc/gemv.c), one step's attention over
a KV cache with grouped-query heads (csrc/attention_decode.c), and a whole decode step of a GPT-2
model (csrc/block.c) or of one with the Llama-style options (csrc/llama_decode.c).

At batch 1 every decode step streams all the weights once, and PyTorch's BLAS matrix-vector
path reads them with one core at ~10-12 GB/s on a 2-core machine; gemv.c splits the rows over
the cores, four distant row streams per core, and streams ~33-45 GB/s there (docs/benchmarks.md).
`linear` is such a product for up to MAX_ROWS rows (`linear_int8` its int8 twin); `DecodeBlocks`
runs all of a model's GPT-2 blocks for one decode step in one call, without ~20 PyTorch calls
around each, and `LlamaDecodeBlocks` those of the other options (RMSNorm, rotary positions,
grouped-query attention, QK-norm, SwiGLU or ReLU^2). Callers check `lib.load()` first: these functions assume the library is loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import torch

from . import lib
from .lib import MAX_INT8_IN, MAX_ROWS, load, unavailable_reason  # noqa: F401 (callers check load() first)
from .slots import BLOCK_SLOTS

# A Llama-style block's tensors for LlamaDecodeBlocks: BLOCK_SLOTS (the same module names: c_attn holds
# q | k | v, the MLP's c_fc gate | up), then the QK-norm gains (csrc/llama.h's Q_NORM_W, K_NORM_W)
LLAMA_SLOTS = BLOCK_SLOTS + (("attn.q_norm", "weight"), ("attn.k_norm", "weight"))
MLP_KINDS = ("gelu", "swiglu", "relu2")  # csrc/llama.h's MLP_* order
NORM_KINDS = ("layernorm", "rmsnorm")  # and its NORM_* order

_threads = 0  # threads of the innermost decoding() block; 0 outside
_pool = 0  # threads the kernel's pool has (a forked child starts with none)


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear(x, weight) may take the kernel: up to MAX_ROWS fp32 rows on the CPU (a
    decode step of up to MAX_ROWS sequences, a short prefill), no autograd, nn.Linear's row-major
    weight."""
    K = weight.size(1)
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.size(-1) == K and x.numel() <= MAX_ROWS * K and weight.is_contiguous()
            and not torch.is_grad_enabled())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear for a few rows (see usable()), with the native kernel on the threads of the innermost
    `decoding()` block (else torch.get_num_threads())."""
    x = x.contiguous()
    bias = None if bias is None else bias.contiguous()  # kept alive until the call returns
    N, K = weight.shape
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    lib._lib.sg_gemv(weight.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                 x.numel() // K, N, K, _call_threads())
    return y


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """linear() for int8 weights (N, K <= MAX_INT8_IN) with fp32 row scales (N,), up to MAX_ROWS rows:
    each row of x is rounded to int8 with its own scale (as q8_0 rounds activations) and the
    products are integer dot products."""
    x = x.contiguous()
    N, K = qweight.shape
    M = x.numel() // K
    if M > MAX_ROWS or K > MAX_INT8_IN:
        raise ValueError(f"linear_int8 takes at most {MAX_ROWS} rows of at most {MAX_INT8_IN}, got {M} of {K}")
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    lib._lib.sg_gemv_q8(qweight.data_ptr(), scale.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(),
                    y.data_ptr(), M, N, K, _call_threads())
    return y


def attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step's attention over a KV cache (csrc/attention_decode.c) on the threads of the
    innermost decoding() block: q (B, H, D) fp32, one new query per row and head (any strides, D
    floats contiguous); k and v (B, Hkv, S_max, D) fp32 cache tensors (slots D floats apart, one
    layout for both), H a multiple of Hkv (grouped-query attention: query head h reads key/value
    head h // (H // Hkv)). Each query attends to its row's slots 0..length-1 that mask (B, >= length)
    int64 marks real (1; 0 = padding; all of them without a mask), with scale 1 / sqrt(D); a row
    with no real slot gets zeros. Returns (B, H, D). ValueError for shapes or layouts it does not take;
    MemoryError without memory for the scores."""
    B, H, D = q.shape
    if q.stride(-1) != 1 or q.stride(1) != D:
        q = q.contiguous()
    if not (k.dim() == 4 and k.shape == v.shape and k.stride() == v.stride() and k.size(0) >= B and k.size(3) == D
            and k.stride(3) == 1 and k.stride(2) == D and H % k.size(1) == 0 and 0 < length <= k.size(2)
            and q.dtype == k.dtype == v.dtype == torch.float32):
        raise ValueError(f"attention_step: q {tuple(q.shape)} and a cache k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"of (B, Hkv, S_max, D) fp32 slots, {length} of them used")
    if mask is not None and not (mask.dtype == torch.int64 and mask.size(0) >= B and mask.size(1) >= length
                                 and mask.stride(1) == 1):
        raise ValueError(f"attention_step: mask must be int64 (>= {B}, >= {length}) with contiguous rows")
    out = torch.empty(B, H, D)
    if not lib._lib.sg_attn_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                   None if mask is None else mask.data_ptr(), 0 if mask is None else mask.stride(0),
                                   B, H, H // k.size(1), length, D, q.stride(0), k.stride(1), k.stride(0),
                                   1.0 / D ** 0.5, _call_threads()):
        raise MemoryError("attention_step: no memory for the scores")
    return out


def _call_threads() -> int:
    """Threads for a kernel call (the innermost decoding() block's, else torch's); starts the pool."""
    global _pool
    threads = _threads or torch.get_num_threads()
    if threads > _pool:
        _pool = lib._lib.sg_init(threads)
    return threads


def _forget_pool() -> None:
    global _pool
    _pool = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


@contextlib.contextmanager
def decoding():
    """A batch-1 decode step: the kernel gets all of torch's threads and torch runs on one meanwhile.

    Both pools spin between calls, so on a machine with as many threads as cores they would
    take turns on the cores instead of working (PyTorch's attention ran 5x slower beside it).
    """
    global _threads
    saved, outer = torch.get_num_threads(), _threads
    _threads = outer or saved
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
        _threads = outer


class DecodeBlocks:
    """A model's GPT-2 blocks for one decode step of up to MAX_ROWS rows, all in one native call
    (sg_blocks1 in csrc/block.c), in place of ~20 PyTorch calls a block. The pointers are gathered once
    (per generate call), not per token.

    blocks: per block its 12 tensors in BLOCK_SLOTS' order (ln_1 weight, bias; c_attn weight, bias;
    attn c_proj weight, bias; ln_2 weight, bias; c_fc weight, bias; mlp c_proj weight, bias), None
    for a missing bias, all contiguous fp32, and None, or for int8 linear weights their 4 fp32 row
    scales in the same order (see linear_int8; every block the same kind). k, v: the KV cache's (n_layer, batch, n_head,
    max_len, head_dim) keys and values.
    """

    slots = BLOCK_SLOTS

    def __init__(self, blocks: list[tuple[list[torch.Tensor | None], list[torch.Tensor] | None]],
                 k: torch.Tensor, v: torch.Tensor, n_head: int, eps: float):
        name = type(self).__name__
        int8 = blocks[0][1] is not None
        if any((scales is not None) != int8 for _, scales in blocks):
            raise ValueError(f"{name}: every block must have int8 linears, or none")
        if any(len(params) != len(self.slots) for params, _ in blocks):
            raise ValueError(f"{name}: each block takes {len(self.slots)} tensors")
        if k.shape != v.shape or k.stride() != v.stride() or k.stride(-1) != 1 or k.stride(-2) != k.size(-1):
            raise ValueError(f"{name}: k and v must be alike, each slot's head_dim floats contiguous")
        L, self.batch, H, self.max_len, D = k.shape
        self._keep = blocks, k, v  # the tensors behind the pointers
        ptr = ctypes.c_void_p
        self.params = (ptr * (len(self.slots) * L))(*(None if t is None else t.data_ptr()
                                                       for params, _ in blocks for t in params))
        self.scales = (ptr * (4 * L))(*(t.data_ptr() for _, scales in blocks for t in scales)) if int8 else None
        self.k = (ptr * L)(*(k[i].data_ptr() for i in range(L)))
        self.v = (ptr * L)(*(v[i].data_ptr() for i in range(L)))
        self.row_stride, self.head_stride = k.stride(1), k.stride(2)
        self.C, self.L, self.n_head, self.eps = H * D, L, n_head, eps
        self.scratch = torch.empty(0)

    def check(self, x: torch.Tensor, pos: int, mask: torch.Tensor | None) -> int:
        """The rows B of x; ValueError for arguments __call__ does not take."""
        name = type(self).__name__
        B = x.numel() // self.C
        if not 0 <= pos < self.max_len:
            raise ValueError(f"cache slot {pos} outside [0, {self.max_len})")
        if not (x.is_contiguous() and x.dtype == torch.float32 and x.numel() == B * self.C
                and 1 <= B <= min(MAX_ROWS, self.batch)):
            raise ValueError(f"{name}: x must be 1..{min(MAX_ROWS, self.batch)} contiguous fp32 rows of "
                             f"{self.C}, got {tuple(x.shape)} {x.dtype}")
        if mask is not None and not (mask.dtype == torch.int64 and mask.size(0) >= B and mask.size(1) > pos
                                     and mask.stride(1) == 1):
            raise ValueError(f"{name}: mask must be int64 (>= {B}, > {pos}) with contiguous rows")
        return B

    def __call__(self, x: torch.Tensor, pos: int, mask: torch.Tensor | None = None) -> None:
        """Every block on x ((B, C) contiguous fp32, in place; B <= MAX_ROWS and the cache's batch)
        for each row's token at cache slot pos: its key and value are written there, and it attends
        to the slots 0..pos that mask (B, >= pos + 1) int64, 1 = real, marks (all of them without)."""
        B = self.check(x, pos, mask)
        threads = _call_threads()
        need = lib._lib.sg_block1_scratch(B, self.C, self.max_len, threads)
        if self.scratch.numel() < need:
            self.scratch = torch.empty(need)
        lib._lib.sg_blocks1(x.data_ptr(), self.params, self.scales, self.k, self.v, self.head_stride, self.row_stride, B,
                        pos, None if mask is None else mask.data_ptr(), 0 if mask is None else mask.stride(0),
                        self.C, self.n_head, self.L, self.eps, self.scratch.data_ptr(), threads)


class LlamaDecodeBlocks(DecodeBlocks):
    """DecodeBlocks for blocks with the Llama-style options (sg_llama_blocks1 in csrc/llama_decode.c):
    RMSNorm with or without a gain (or LayerNorm with one), rotary positions, grouped-query attention
    over the KV cache, QK-norm, a SwiGLU, ReLU^2 or GELU MLP, biases or none.

    blocks: per block its tensors in LLAMA_SLOTS' order (None for a missing bias, gain or QK-norm),
    and its int8 row scales as for DecodeBlocks. k, v: the KV cache's (n_layer, batch, n_kv_head,
    max_len, head_dim) keys and values. config: the model's GPTConfig (its shape and options);
    eps: the block norms' epsilon, qk_eps QK-norm's. ValueError for a norm kind or an MLP it does not
    know, or a LayerNorm without a gain.
    """

    slots = LLAMA_SLOTS

    def __init__(self, blocks, k: torch.Tensor, v: torch.Tensor, config, eps: float, qk_eps: float):
        if lib._lib.sg_llama_slots() != len(LLAMA_SLOTS):
            raise RuntimeError(f"the library's Llama block takes {lib._lib.sg_llama_slots()} tensors, "
                               f"not LLAMA_SLOTS' {len(LLAMA_SLOTS)}")
        super().__init__(blocks, k, v, config.n_head, eps)
        if config.mlp not in MLP_KINDS or config.norm not in NORM_KINDS:
            raise ValueError(f"LlamaDecodeBlocks: no kernel for norm {config.norm!r} with mlp {config.mlp!r}")
        if config.norm == "layernorm" and any(params[LLAMA_SLOTS.index(("ln_1", "weight"))] is None
                                              for params, _ in blocks):
            raise ValueError("LlamaDecodeBlocks: a LayerNorm without a gain has no kernel")
        H, K, D = config.n_head, config.kv_heads, config.head_dim
        if k.size(2) != K or k.size(4) != D:
            raise ValueError(f"LlamaDecodeBlocks: the cache holds {k.size(2)} heads of {k.size(4)}, "
                             f"the model {K} of {D}")
        self.C, self.qk_eps = config.n_embd, qk_eps
        self.dims = (ctypes.c_int * 8)(config.n_embd, H, K, D, config.ffn_size, MLP_KINDS.index(config.mlp),
                                       NORM_KINDS.index(config.norm), int(config.qk_norm))
        # rotary_angles' frequencies (model.py), computed as it does them
        self.inv_freq = None
        if config.positions == "rotary":
            self.inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2).float() / D))  # (D/2,)

    def __call__(self, x: torch.Tensor, pos: int, mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None) -> None:
        """As DecodeBlocks.__call__, with positions (B,) int64 contiguous: each row's rotary position
        (needed with rotary positions; ignored without)."""
        B = self.check(x, pos, mask)
        if self.inv_freq is not None and not (positions is not None and positions.dtype == torch.int64
                                              and positions.numel() >= B and positions.is_contiguous()):
            raise ValueError(f"LlamaDecodeBlocks: positions must be >= {B} contiguous int64, one a row")
        threads = _call_threads()
        need = lib._lib.sg_llama_block1_scratch(B, self.dims, self.max_len, threads)
        if self.scratch.numel() < need:
            self.scratch = torch.empty(need)
        lib._lib.sg_llama_blocks1(x.data_ptr(), self.params, self.scales, self.k, self.v, self.head_stride,
                                  self.row_stride, B, pos, None if self.inv_freq is None else positions.data_ptr(),
                                  None if mask is None else mask.data_ptr(), 0 if mask is None else mask.stride(0),
                                  self.dims, self.L, None if self.inv_freq is None else self.inv_freq.data_ptr(),
                                  self.eps, self.qk_eps, self.scratch.data_ptr(), threads)
