/* The conventions of the kernels for models with the Llama-style options (llama_model.c's training
 * pass; llama_decode.c's decode step keeps the same values): a block's parameter slots and the
 * `dims` array that describes the model's shape and options. */
#ifndef SIMPLEGPT_LLAMA_H
#define SIMPLEGPT_LLAMA_H
#include "slots.h"

/* A block's parameters: BLOCK_SLOTS (NULL for a missing bias or gain), then the QK-norm gains
 * (NULL without QK-norm or without a gain): decode.py's LLAMA_SLOTS */
enum { Q_NORM_W = BLOCK_NSLOTS, K_NORM_W, LLAMA_NSLOTS };

/* dims' entries: C (n_embd), H query heads, K key/value heads, D head size, F the MLP's width
 * (c_fc has 2F rows for SwiGLU: gate | up), the MLP kind, the norm kind, QK-norm on (1) or off */
enum { DIM_C, DIM_H, DIM_K, DIM_D, DIM_F, DIM_MLP, DIM_NORM, DIM_QK_NORM, NDIMS };
enum { MLP_GELU, MLP_SWIGLU, MLP_RELU2 };
enum { NORM_LAYER, NORM_RMS };

#endif
