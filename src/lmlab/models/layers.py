"""Small stateless pieces shared by the model families: activations and attention."""

from __future__ import annotations

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


class Dropout(nn.Module):
    """nn.Dropout's function (each element zeroed with probability p, the rest scaled by
    1/(1-p)), with a cheaper mask on the CPU: torch's CPU dropout draws a Bernoulli per element,
    `rand_like(x) >= p` one vectorised uniform — a T5 training step 1.05–1.18× faster on 2
    cores than with nn.Dropout (benchmarks/t5_speed.py). On accelerators F.dropout is already
    one fused kernel."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return x * (torch.rand_like(x) >= self.p) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def label_names(id2label) -> list[str]:
    """A classifier config's label names as strings, refusing duplicates (both families' configs)."""
    names = [str(label) for label in id2label]
    if len(set(names)) != len(names):
        raise ConfigError(f"id2label has duplicate labels: {names}")
    return names


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


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask of packed rows, given which document each token is in
    (B, T): a query attends to earlier keys of its own document only — block-diagonal causal
    attention, so packed documents never see each other."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


def positions_in_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token within its document (documents are contiguous runs)."""
    T = document_ids.shape[1]
    index = torch.arange(T, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    # the index of each run's first token, carried forward along the row
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first
