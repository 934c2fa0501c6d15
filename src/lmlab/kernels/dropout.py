"""Dropout in C for CPU training (dropout_f32.c says why and how): `native_dropout(model)` swaps
every `lmlab.models.layers.Dropout` in `model` (T5's) for `NativeDropout` while a training run
lasts, and puts the originals back after.

`NativeDropout` is the same function — each element zeroed with probability p, the rest scaled
by 1/(1-p) — with other random numbers: its masks come from a counter-based hash seeded from
torch's generator (one 64-bit draw per call), so `torch.manual_seed` and a checkpoint's RNG
state still decide them, and they do not depend on the number of threads. Where the kernels do
not apply (not an fp32 CPU tensor, the speed layer off or not built here) it is `Dropout`.
"""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator

import torch
import torch.nn as nn

from lmlab.kernels import build
from lmlab.models.layers import Dropout


class _DropoutFunction(torch.autograd.Function):
    """out = x · keep / (1 − p), keep drawn in C; the backward multiplies by the same mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, functions: dict) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        keep = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)  # a bit an element
        seed = int(torch.empty((), dtype=torch.int64).random_())  # torch's generator decides
        scale = 1.0 / (1.0 - p)
        threshold = min(round(p * 2**32), 2**32 - 1)  # kept when the 32 random bits reach it
        functions["dropout"](x.data_ptr(), out.data_ptr(), keep.data_ptr(), x.numel(), seed,
                             threshold, scale, torch.get_num_threads())
        ctx.save_for_backward(keep)
        ctx.scale, ctx.functions = scale, functions
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        ctx.functions["dropout_backward"](grad.data_ptr(), keep.data_ptr(), out.data_ptr(),
                                          grad.numel(), ctx.scale, torch.get_num_threads())
        return out, None, None


class NativeDropout(Dropout):
    """`Dropout` whose mask is drawn in C on fp32 CPU tensors (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or self.p == 0.0 or x.device.type != "cpu"
                or x.dtype != torch.float32):
            return super().forward(x)
        functions = build.load()  # None when switched off (read at each use) or not built
        if functions is None:
            return super().forward(x)
        return _DropoutFunction.apply(x, self.p, functions)


@contextmanager
def native_dropout(model: nn.Module, *, enabled: bool = True) -> Iterator[int]:
    """Within the block, `model`'s `Dropout` modules (exactly that class, p > 0) are
    `NativeDropout`s of the same p; yields how many were swapped (0 when not `enabled`, the
    speed layer is off or cannot be built here). The originals are back on exit, so the model
    a run hands back is the one it was given."""
    found = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if type(child) is Dropout and child.p > 0]
    # The library is built (once per machine) only for a model that has something to swap.
    swapped = found if found and enabled and build.load() is not None else []
    for parent, name, child in swapped:
        native = NativeDropout(child.p)
        native.train(child.training)
        setattr(parent, name, native)
    try:
        yield len(swapped)
    finally:
        for parent, name, child in reversed(swapped):
            child.train(getattr(parent, name).training)
            setattr(parent, name, child)
