"""Device and precision: auto-detection, so the same command runs on CPU and CUDA."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch.utils.checkpoint import checkpoint

from lmlab.errors import ConfigError


DEVICE_HELP = ("auto (CUDA when present, else the CPU), cpu, cuda or cuda:N; under torchrun "
               "auto and cuda mean cuda:LOCAL_RANK")


def pick_device(name: str = "auto", *, flag: str = "device") -> torch.device:
    """THE device rule, used by every command and recipe: `auto` is CUDA when present, else the
    CPU; `cpu`, `cuda` and `cuda:N` are honoured, or a ConfigError says why they cannot be.

    A CUDA device always comes back with its index (torch.cuda.set_device and DDP need one):
    `cuda` is the current device — under torchrun (LOCAL_RANK set) cuda:LOCAL_RANK, one GPU per
    process. An explicit `cuda:N` under torchrun with several processes is an error rather than
    every rank on GPU N (NCCL refuses two ranks on one GPU); with one process it is honoured.
    `flag` names the setting in messages (`--device` on the command line)."""
    text = str(name).strip().lower()
    local_rank = os.environ.get("LOCAL_RANK")
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "mps":  # Apple GPUs: honoured where present, never chosen by auto
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"{flag}: 'mps' requested but this torch has no MPS device")
        return torch.device("mps")
    if text == "cpu":
        return torch.device("cpu")
    kind, _, index_text = text.partition(":")
    if kind != "cuda" or (index_text and not index_text.isdigit()):
        raise ConfigError(f"{flag}: expected {DEVICE_HELP}; got {name!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"{flag}: {name!r} requested but CUDA is not available (no GPU, or a "
                          f"CPU-only torch {torch.__version__}); use {flag} cpu or auto")
    count = torch.cuda.device_count()
    if index_text:
        index = int(index_text)
        if local_rank is not None and world_size > 1:
            raise ConfigError(f"{flag}: {name!r} under torchrun with {world_size} processes "
                              f"would put every process on GPU {index}; use {flag} cuda (or "
                              "auto): each process takes cuda:LOCAL_RANK")
    elif local_rank is not None:
        index = int(local_rank)
    else:
        index = torch.cuda.current_device()
    if index >= count:
        what = (f"LOCAL_RANK {index}" if not index_text else f"{name!r}")
        raise ConfigError(f"{flag}: {what} but only {count} CUDA device(s) are visible "
                          f"(CUDA_VISIBLE_DEVICES); start at most {count} processes per node, "
                          f"or use {flag} cpu")
    return torch.device("cuda", index)


def setup_cuda(device: torch.device) -> None:
    """Training-time CUDA settings: TF32 tensor cores for fp32 matmuls and convolutions
    (Ampere and newer; ~8x the fp32 rate at a 10-bit mantissa, what PyTorch Lightning and
    nanoGPT use), and `device` made the current one. A no-op on the CPU."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.cuda.set_device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively: CUDA compute capability >= 8.0 (Ampere and
    newer). V100 and T4 only emulate bf16 — slower than fp32 there."""
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation
        return torch.cuda.get_device_capability(device)[0] >= 8


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype to autocast matmuls to, or None for plain fp32.

    "auto" means bf16 on CUDA devices that compute it natively (compute capability >= 8.0) and
    fp32 elsewhere: CPUs without bf16 matrix instructions, and V100/T4, which only emulate bf16,
    run bf16 matmuls slower than fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ConfigError(f"precision: expected auto, fp32 or bf16, got {precision!r}")
    return torch.bfloat16 if native_bf16(device) else None


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
