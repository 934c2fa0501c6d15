"""Small stateless pieces shared by the model families: activations and attention."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

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
# Rows from which the packed path is used. Measured here (2026-11-28, greedy decoding, A/B in
# one process): even one row (a matrix-vector product) is 12–15% faster packed than with BLAS.
PACKED_MIN_ROWS = 1


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that decodes faster on CPU.

    Decoding multiplies a handful of rows (1 token, 5 beams, 16 prompts) by every weight matrix. On CPUs
    without a fast small-M GEMM path, BLAS runs those products far below memory bandwidth;
    oneDNN with the weight reordered once into its blocked layout ("prepacked", as
    torch.compile's CPU freezing does) runs them several times faster. The packed copy exists
    only inside `packed_inference(model)` — the decoding functions enter it — and is dropped on
    exit, so weights can never be stale and no second copy is held outside decoding. Autograd
    and training always use plain F.linear.
    """

    _packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self._packed is not None and not torch.is_grad_enabled()
                and x.numel() >= PACKED_MIN_ROWS * x.shape[-1]):
            flat = x.reshape(-1, x.shape[-1])
            out = torch.ops.mkldnn._linear_pointwise(flat, self._packed, self.bias, "none", [], "")
            return out.view(*x.shape[:-1], out.shape[-1])
        return F.linear(x, self.weight, self.bias)


@contextlib.contextmanager
def packed_inference(model: nn.Module):
    """Within this block, CPU fp32 `Linear` layers of `model` multiply with prepacked weights.

    Re-entrant (speculative decoding nests the target's and the draft's blocks; generate() nests
    its strategies'): the outermost block packs and unpacks.
    """
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    usable = ONEDNN and all(m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
                            for m in layers)
    outermost = usable and getattr(model, "_packed_depth", 0) == 0
    if usable:
        model._packed_depth = getattr(model, "_packed_depth", 0) + 1
    try:
        if outermost:
            with torch.no_grad():
                for m in layers:
                    m._packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), None)
        yield model
    finally:
        if usable:
            model._packed_depth -= 1
        if outermost:
            for m in layers:
                m._packed = None


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
