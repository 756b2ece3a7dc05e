"""The order in which the C kernels take a GPT-2 block's parameters: one list for every caller.

Each slot is (submodule path inside model.Block, parameter name); a missing bias is passed as NULL.
"""

BLOCK_SLOTS: tuple[tuple[str, str], ...] = (
    ("ln_1", "weight"), ("ln_1", "bias"),
    ("attn.c_attn", "weight"), ("attn.c_attn", "bias"),
    ("attn.c_proj", "weight"), ("attn.c_proj", "bias"),
    ("ln_2", "weight"), ("ln_2", "bias"),
    ("mlp.c_fc", "weight"), ("mlp.c_fc", "bias"),
    ("mlp.c_proj", "weight"), ("mlp.c_proj", "bias"),
)
