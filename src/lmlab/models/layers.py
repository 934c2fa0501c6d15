"""Small stateless pieces shared by the model families: activations and attention."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab import kernels
from lmlab.errors import ConfigError

# GPT-2 uses the tanh approximation of GELU ("gelu_new"); BERT the exact one; the original
# Transformer ReLU. F.gelu(approximate="tanh") is one fused kernel, where transformers'
# NewGELUActivation is a chain of five element-wise ops.
ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


def label_names(id2label) -> list[str]:
    """A classifier config's label names as strings, refusing duplicates (both families' configs)."""
    names = [str(label) for label in id2label]
    if len(set(names)) != len(names):
        raise ConfigError(f"id2label has duplicate labels: {names}")
    return names


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_available()


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that decodes faster on CPU.

    Decoding multiplies a handful of rows (1 token, 5 beams, 16 prompts) by every weight
    matrix, and its speed is how fast the weights stream from memory. On CPUs without a fast
    small-M GEMM path, BLAS runs those products far below memory bandwidth. Inside
    `packed_inference(model)` — the decoding functions enter it — two faster paths are used:
    up to `kernels.MAX_ROWS` rows, lmlab's own streaming kernel (lmlab/kernels; ~25% less time
    than the next path for one row, and batch-invariant bit for bit); beyond that, oneDNN with
    the weight reordered into its blocked layout ("prepacked", as torch.compile's CPU freezing
    does). Reordering costs as much as dozens of products (~11 ms per GPT-2-124M matrix), so a
    layer is packed only on its *second* wide call in a block: a prompt's one-off prefill runs
    on BLAS, a batch-16 decode packs once and reuses it every step. The packed copy is dropped
    when the block exits, so weights can never be stale and no second copy is held outside
    decoding. Autograd and training always use plain F.linear.
    """

    _packed: torch.Tensor | None = None
    _decoding = False  # inside packed_inference, on CPU in fp32
    _wide_calls = 0  # calls with more than kernels.MAX_ROWS rows in the current block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._decoding or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        if len(flat) <= kernels.MAX_ROWS and self.weight.is_contiguous() and kernels.available():
            out = kernels.linear(flat, self.weight, self.bias)
        else:
            self._wide_calls += 1
            if self._packed is None and self._wide_calls >= 2 and ONEDNN:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
            if self._packed is None:
                return F.linear(x, self.weight, self.bias)
            out = torch.ops.mkldnn._linear_pointwise(flat, self._packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def packed_inference(model: nn.Module):
    """Within this block, CPU fp32 `Linear` layers of `model` take the decoding paths above
    (lmlab's kernel for a few rows, prepacked oneDNN weights for repeated wider products).

    Re-entrant (speculative decoding nests the target's and the draft's blocks; generate() nests
    its strategies'): the outermost block sets up and tears down.
    """
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    usable = all(m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
                 for m in layers)
    outermost = usable and getattr(model, "_packed_depth", 0) == 0
    if usable:
        model._packed_depth = getattr(model, "_packed_depth", 0) + 1
    try:
        if outermost:
            for m in layers:
                m._decoding = True
        yield model
    finally:
        if usable:
            model._packed_depth -= 1
        if outermost:
            for m in layers:
                m._packed = None
                m._decoding = False
                m._wide_calls = 0
            model._decode_plan = None  # a model's memo for the block (GPT: fused step or not)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    is_causal: bool,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention on (B, nh, T, hs) tensors.

    `mask` is a boolean (B, 1, T, S) tensor, True where a query may attend. When it is None and
    `is_causal` is set, SDPA builds the causal mask itself and can use its flash kernel.
    """
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, dropout_p=dropout
    )


def padded_causal_mask(attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """Boolean (B, 1, Tq, S) mask for the last `query_len` of S positions, given a (B, S) 0/1
    padding mask: a query attends to earlier non-pad keys, and a pad query to itself only, so
    that its softmax never sees an empty row (its output is never used)."""
    batch, total = attention_mask.shape
    device = attention_mask.device
    key_pos = torch.arange(total, device=device)
    query_pos = torch.arange(total - query_len, total, device=device)
    causal = key_pos[None, :] <= query_pos[:, None]  # (Tq, S)
    keep = causal[None] & attention_mask[:, None, :].bool()  # (B, Tq, S)
    keep = keep | (key_pos[None, None, :] == query_pos[None, :, None])
    return keep[:, None]
