"""nanoGPT's CPU recipe for character-level tiny Shakespeare, run as a user runs it.

Times the whole command (`lmlab pretrain --config configs/pretrain/shakespeare_char.yaml …`,
interpreter start-up, data preparation and evaluations included) by wall clock, and reads the
final validation loss (over the whole validation split) from metrics.jsonl. The reference is
nanoGPT's own train.py on the same recipe on this kind of machine (2 cores): about 155 s wall
time, 65–80 ms per iteration, validation loss 1.886 (median of 3 runs, from the issue tracker;
nanoGPT itself is not installed here).

    python benchmarks/shakespeare_char.py [--runs 3] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "tiny_shakespeare" / "input.txt"
NANOGPT_SECONDS, NANOGPT_LOSS = 155.0, 1.886


def run_once(out: Path, seed: int) -> tuple[float, float, float]:
    cmd = [sys.executable, "-m", "lmlab", "pretrain", "--config",
           str(ROOT / "configs/pretrain/shakespeare_char.yaml"), "--data", str(DATA),
           "--out", str(out), "--no-progress", "--seed", str(seed)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val_loss" in r][-1]
    steps = final["step"]
    train_rate = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][-1]
    ms_per_iter = 12 * 64 / train_rate * 1000
    assert steps == 2000, steps
    return wall, final["val_loss"], ms_per_iter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"{DATA} not found: this benchmark needs ../shared/data beside the checkout")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            # A run is deterministic given its seed: vary it, so the loss figure shows its spread.
            results.append(run_once(Path(tmp) / f"run{i}", seed=1337 + i))
            print(f"run {i + 1}: {results[-1][0]:.1f} s wall, val loss {results[-1][1]:.4f}, "
                  f"{results[-1][2]:.1f} ms/iteration", flush=True)
    wall = statistics.median(r[0] for r in results)
    loss = statistics.median(r[1] for r in results)
    ms = statistics.median(r[2] for r in results)
    report = "\n".join([
        f"nanoGPT's CPU recipe, character-level tiny Shakespeare (4 layers, 4 heads, width 128, "
        f"context 64, batch 12, 2000 iterations, lr 1e-3 cosine to 1e-4, dropout 0, evaluation "
        f"every 250 steps). Whole command, wall clock, median of {len(results)} runs (seeds 1337, 1338, …); "
        f"{machine()}; measured {date.today().isoformat()}.",
        "",
        "| | wall time | ms / iteration | final val loss |",
        "|---|---:|---:|---:|",
        f"| nanoGPT train.py (reference figure, same kind of machine) | ~{NANOGPT_SECONDS:.0f} s | 65–80 | {NANOGPT_LOSS} |",
        f"| lmlab (`configs/pretrain/shakespeare_char.yaml`) | {wall:.0f} s | {ms:.0f} | {loss:.3f} |",
        "",
        f"**lmlab wall time / nanoGPT: {wall / NANOGPT_SECONDS:.2f}×** (runs: "
        + ", ".join(f"{r[0]:.0f} s / {r[1]:.3f}" for r in results) + ")",
        "",
        "lmlab's validation loss is over the whole validation split (the last 10% of the text) in "
        "non-overlapping 64-character windows; nanoGPT's over 20 random batches.",
        "",
        "Reproduce: `python benchmarks/shakespeare_char.py --write`",
    ])
    print(report)
    if args.write:
        update_section("shakespeare_char", report)


if __name__ == "__main__":
    main()
