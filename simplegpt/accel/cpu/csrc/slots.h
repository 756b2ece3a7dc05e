/* The order in which the kernels take a GPT-2 block's 12 parameters: one list for C and Python.
 *
 * Each entry is (the C index's name, the submodule inside model.Block, the parameter's name).
 * simplegpt/accel/cpu/slots.py reads BLOCK_SLOTS from this file, and the library reports its own
 * copy (sg_block_slot), which lib.py checks at load: the three cannot drift apart. Biases may be
 * NULL (a model without biases); the LayerNorm weights and the linear weights may not. */
#ifndef SIMPLEGPT_SLOTS_H
#define SIMPLEGPT_SLOTS_H

#define BLOCK_SLOTS(X)                 \
    X(LN1_W, "ln_1", "weight")         \
    X(LN1_B, "ln_1", "bias")           \
    X(ATTN_W, "attn.c_attn", "weight") \
    X(ATTN_B, "attn.c_attn", "bias")   \
    X(PROJ_W, "attn.c_proj", "weight") \
    X(PROJ_B, "attn.c_proj", "bias")   \
    X(LN2_W, "ln_2", "weight")         \
    X(LN2_B, "ln_2", "bias")           \
    X(FC_W, "mlp.c_fc", "weight")      \
    X(FC_B, "mlp.c_fc", "bias")        \
    X(MP_W, "mlp.c_proj", "weight")    \
    X(MP_B, "mlp.c_proj", "bias")

#define SLOT_INDEX(name, module, param) name,
enum { BLOCK_SLOTS(SLOT_INDEX) BLOCK_NSLOTS };
#undef SLOT_INDEX

/* int8 decoding: the row scales of the block's 4 linears, in this order (c_attn, attn c_proj,
 * c_fc, mlp c_proj: the order of their weights above) */
enum { ATTN_S, PROJ_S, FC_S, MP_S, BLOCK_NSCALES };

#endif
