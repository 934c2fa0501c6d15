"""Shared benchmark helpers: alternating A/B timing, the machine's matmul peak, BENCHMARKS.md."""

from __future__ import annotations

import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from lmlab.training.perf import matmul_peak_flops

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def alternate(fns: dict[str, Callable[[], None]], *, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Time each function `rounds` times, interleaved A, B, A, B … so that slow phases of a shared
    machine hit every contender alike; return the seconds of every call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of an n×n×n matmul on this machine (all threads) — the same
    measurement training logs MFU against (lmlab.training.perf)."""
    return matmul_peak_flops("cpu", torch.float32, n=n, repeats=repeats) / 1e9


def memory_bandwidth_gbs(mbytes: int = 256, repeats: int = 5) -> float:
    """Best GB/s of reading a large buffer (a sum over it), the bound for weight-streaming decode."""
    x = torch.ones(mbytes * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def update_section(name: str, body: str) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` in BENCHMARKS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)
