"""What a run achieves against what the hardware can do: the matmul peak, MFU, peak memory."""

from __future__ import annotations

import functools
import os
import resource
import sys
import time

import torch

from lmlab.errors import ConfigError

PEAK_ENV = "LMLAB_MATMUL_PEAK_FLOPS"


@functools.lru_cache(maxsize=None)
def matmul_peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, *,
                      n: int | None = None, repeats: int = 5) -> float:
    """The best FLOP/s of an n×n×n matmul on `device` in `dtype` — the denominator of MFU.

    n defaults to 2048 on a CPU and 8192 on a GPU (smaller products do not fill one). Measured
    once per (device, dtype, n) in a process; the environment variable LMLAB_MATMUL_PEAK_FLOPS
    replaces the measurement (a datasheet figure, or to save the second it takes). Uses its own
    generator so that measuring never moves the global RNG (a resumed run must draw the same
    dropout masks)."""
    if os.environ.get(PEAK_ENV):
        try:
            return float(os.environ[PEAK_ENV])
        except ValueError:
            raise ConfigError(f"{PEAK_ENV}: expected FLOP/s as a number, got "
                              f"{os.environ[PEAK_ENV]!r}") from None
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 2048)
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, generator=gen).to(dtype)
    b = torch.randn(n, n, device=dev, generator=gen).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        a @ b
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start CUDA's peak-memory count afresh (after the FLOPs probe); a no-op elsewhere (the
    CPU's peak resident set cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA's peak allocated memory on `device`, else this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
