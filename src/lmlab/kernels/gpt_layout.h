/* The GPT model as the C kernels see it: activations and the per-layer tensor table. */
#ifndef LMLAB_GPT_LAYOUT_H
#define LMLAB_GPT_LAYOUT_H

enum { ACT_GELU_TANH = 0, ACT_GELU = 1, ACT_RELU = 2 };

/* Per layer, in this order (biases may be NULL when the model has none). */
enum { LN1_W, LN1_B, ATTN_W, ATTN_B, PROJ_W, PROJ_B, LN2_W, LN2_B, FC_W, FC_B, FC2_W, FC2_B,
       PER_LAYER };

#endif
