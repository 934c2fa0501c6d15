"""Device and precision: auto-detection, so the same command runs on CPU and CUDA."""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint

from lmlab.errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    return device


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype to autocast matmuls to, or None for plain fp32.

    "auto" means bf16 on CUDA devices that support it and fp32 on CPU: CPUs without bf16
    matrix instructions run bf16 matmuls many times slower than fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ConfigError(f"precision: expected auto, fp32 or bf16, got {precision!r}")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated layers of a model — every element of every `nn.ModuleList` (GPT's `h`, an
    encoder's layers): the units that FSDP shards and activation checkpointing recomputes."""
    return [block for module in model.modules() if isinstance(module, torch.nn.ModuleList)
            for block in module]


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Activation checkpointing: each block keeps only its input during the forward pass and
    recomputes the rest in backward (less memory, about one more forward of compute). Dropout
    masks are replayed exactly (the RNG state is saved), so gradients equal those without it.
    Returns the number of blocks wrapped."""
    wrapped = blocks(model)
    for block in wrapped:
        block.forward = functools.partial(_checkpointed, block.forward)
    return len(wrapped)


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation and decoding: nothing to save memory for
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
