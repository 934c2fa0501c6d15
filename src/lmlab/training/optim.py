"""AdamW with weight decay on matrices only (embedding tables included, as GPT-2 and nanoGPT; not
biases or LayerNorm gains), and gradient clipping. Or Adafactor (`optimizer: adafactor`), whose
steps are relative to each weight's RMS: T5's optimizer, which its initialisation (unit-variance
embeddings, unscaled attention) is made for — under AdamW a T5 from scratch learns far slower.

On one CPU process the CPU speed layer's `FlatAdamW` (lmlab/kernels/flat_adamw.py: the same
fused AdamW arithmetic over parameters laid out in one buffer) is used where the rule of
lmlab/kernels/__init__.py says so; elsewhere torch.optim.AdamW with its fused kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmlab import kernels
from lmlab.kernels.flat_adamw import FlatAdamW


def build_optimizer(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float = 1e-8,
    distributed: bool = False,
    speed_layer: bool = True,
    name: str = "adamw",
) -> FlatAdamW | torch.optim.AdamW | torch.optim.Adafactor:
    """AdamW over the model's trainable parameters in two groups (decay, no decay): a
    `FlatAdamW` where the CPU speed layer applies (one process, every parameter a CPU tensor of
    one floating dtype; building it lays the parameters out in one buffer), otherwise
    torch.optim.AdamW. A model that DDP or FSDP wraps (`distributed`) is never re-laid: they
    manage its parameters' memory. `speed_layer=False` always gives torch.optim.AdamW."""
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
    if name == "adafactor":
        # lr caps the relative step (torch's rho = min(lr, 1/sqrt(step))); betas and eps are
        # AdamW's and do not apply
        return torch.optim.Adafactor(groups, lr=lr)
    if speed_layer and kernels.flat_optimizer_applies(params, distributed=distributed):
        return FlatAdamW(groups, lr=lr, betas=betas, eps=eps)
    # The fused kernel updates every parameter in one pass instead of a dozen element-wise
    # passes per tensor; it exists on CPU and CUDA for floating-point parameters.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def clip_grad_norm_(params: list[Tensor], max_norm: float, optimizer=None) -> Tensor:
    """Clip the gradients' joint 2-norm to `max_norm` as torch.nn.utils.clip_grad_norm_ does;
    return the norm before clipping. With a FlatAdamW whose gradients lie back to back, the
    norm is one pass over them and the scaling is left to that optimizer's next step (its
    fused kernel divides each gradient as it reads it): the gradients stay unscaled until then,
    and one pass over them is saved."""
    if isinstance(optimizer, FlatAdamW):
        norm = optimizer.clip_grad_norm_(max_norm)
        if norm is not None:
            return norm
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
