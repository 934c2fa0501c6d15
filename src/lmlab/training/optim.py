"""AdamW with weight decay on matrices only (embedding tables included, as GPT-2 and nanoGPT; not
biases or LayerNorm gains)."""

from __future__ import annotations

import torch


def build_optimizer(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in params:
        if id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel updates every parameter in one pass instead of a dozen element-wise
    # passes per tensor; it exists on CPU and CUDA for floating-point parameters.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
