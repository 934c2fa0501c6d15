"""nanoGPT's CPU recipe for character-level tiny Shakespeare, run as a user runs it.

Times the whole command (`lmlab pretrain --config configs/pretrain/shakespeare_char.yaml …`,
interpreter start-up, data preparation and evaluations included) by wall clock, and reads the
final validation loss (over the whole validation split) from metrics.jsonl.

The peer is nanoGPT's own train.py on the same recipe. Give `--nanogpt DIR` (a checkout of
github.com/karpathy/nanoGPT whose data/shakespeare_char/ holds train.bin, val.bin and meta.pkl
from its prepare.py) and the two commands run alternately, round after round, on this machine;
without it the ratio is taken against a figure measured earlier on another machine of this kind
(155 s), which says little: CPUs differ by 2x between sessions here.

    python benchmarks/shakespeare_char.py [--runs 3] [--nanogpt DIR] [--write]
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
NANOGPT_SECONDS, NANOGPT_LOSS = 155.0, 1.886  # the reference figure, without --nanogpt
NANOGPT_RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
                  "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12",
                  "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
                  "--lr_decay_iters=2000", "--dropout=0.0"]


# Run in the nanoGPT checkout with its own model.py: the loss of the checkpoint train.py saved,
# over the whole validation split in non-overlapping windows — lmlab's measure, so the two
# models are compared on the same number (nanoGPT's own figure is from 20 random batches).
WHOLE_SPLIT_LOSS = """
import sys, numpy as np, torch
from model import GPT, GPTConfig
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=False)  # nanoGPT's own file
model = GPT(GPTConfig(**ckpt["model_args"]))
model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
model.eval()
val = np.fromfile("data/shakespeare_char/val.bin", dtype=np.uint16).astype(np.int64)
T = ckpt["model_args"]["block_size"]
n = (len(val) - 1) // T
x = torch.from_numpy(val[:n * T]).view(n, T)
y = torch.from_numpy(val[1:n * T + 1]).view(n, T)
total = 0.0
with torch.no_grad():
    for i in range(0, n, 256):
        total += model(x[i:i + 256], y[i:i + 256])[1].item() * len(x[i:i + 256])
print(ckpt["iter_num"], total / n)
"""


def run_nanogpt(checkout: Path, out: Path) -> tuple[float, float, float, float]:
    """nanoGPT's train.py on the recipe (README's CPU command): wall seconds, its last val loss
    (20 random batches), its saved checkpoint's loss on the whole validation split, and the
    median of the per-iteration times it prints."""
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "train.py", *NANOGPT_RECIPE, f"--out_dir={out}"],
                            cwd=checkout, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = result.stdout.splitlines()
    last = [line for line in lines if line.startswith("step 2000:")]
    # "iter N: loss L, time Tms, mfu M%"
    iteration_ms = [float(line.split("time ")[1].split("ms")[0]) for line in lines
                    if line.startswith("iter ") and "time " in line]
    whole = subprocess.run([sys.executable, "-c", WHOLE_SPLIT_LOSS, str(out / "ckpt.pt")],
                           cwd=checkout, check=True, capture_output=True, text=True)
    iteration, loss = whole.stdout.splitlines()[-1].split()  # model.py prints its size first
    if int(iteration) != 2000:  # train.py saves only when its estimate improves
        print(f"note: nanoGPT's checkpoint is from iteration {iteration}", flush=True)
    return (wall, float(last[-1].rsplit("val loss", 1)[1]), float(loss),
            statistics.median(iteration_ms))


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
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout to time alongside")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"{DATA} not found: this benchmark needs ../shared/data beside the checkout")
    if args.nanogpt and not (args.nanogpt / "data/shakespeare_char/train.bin").exists():
        sys.exit(f"{args.nanogpt}/data/shakespeare_char/train.bin not found: run nanoGPT's "
                 "data/shakespeare_char/prepare.py there first")
    results, peer = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            if args.nanogpt:  # alternate, so that both see the same phases of a noisy machine
                peer.append(run_nanogpt(args.nanogpt, Path(tmp) / f"nanogpt{i}"))
                print(f"nanoGPT run {i + 1}: {peer[-1][0]:.1f} s wall, val loss {peer[-1][1]:.4f} "
                      f"(whole split: {peer[-1][2]:.4f})", flush=True)
            # A run is deterministic given its seed: vary it, so the loss figure shows its spread.
            results.append(run_once(Path(tmp) / f"run{i}", seed=1337 + i))
            print(f"lmlab run {i + 1}: {results[-1][0]:.1f} s wall, val loss "
                  f"{results[-1][1]:.4f}, {results[-1][2]:.1f} ms/iteration", flush=True)
    peer_wall = statistics.median(r[0] for r in peer) if peer else NANOGPT_SECONDS
    peer_loss = statistics.median(r[1] for r in peer) if peer else NANOGPT_LOSS
    wall = statistics.median(r[0] for r in results)
    loss = statistics.median(r[1] for r in results)
    ms = statistics.median(r[2] for r in results)
    pairs = [ours[0] / theirs[0] for ours, theirs in zip(results, peer)]
    report = "\n".join([
        f"nanoGPT's CPU recipe, character-level tiny Shakespeare (4 layers, 4 heads, width 128, "
        f"context 64, batch 12, 2000 iterations, lr 1e-3 cosine to 1e-4, dropout 0, evaluation "
        f"every 250 steps). Whole command, wall clock, median of {len(results)} runs (seeds 1337, 1338, …); "
        f"{machine()}; measured {date.today().isoformat()}.",
        "",
        "| | wall time | ms / iteration | val loss, whole split | val loss, 20 random batches |",
        "|---|---:|---:|---:|---:|",
        (f"| nanoGPT train.py (same machine, alternating runs) | {peer_wall:.0f} s | "
         f"{statistics.median(r[3] for r in peer):.0f} | "
         f"{statistics.median(r[2] for r in peer):.3f} | {peer_loss:.3f} |" if peer else
         f"| nanoGPT train.py (reference figure, another machine) | ~{NANOGPT_SECONDS:.0f} s | "
         f"65–80 | – | {NANOGPT_LOSS} |"),
        f"| lmlab (`configs/pretrain/shakespeare_char.yaml`) | {wall:.0f} s | {ms:.0f} | "
        f"{loss:.3f} | – |",
        "",
        f"**lmlab wall time / nanoGPT: {wall / peer_wall:.2f}×** (lmlab runs: "
        + ", ".join(f"{r[0]:.0f} s / {r[1]:.3f}" for r in results)
        + ("; nanoGPT runs: " + ", ".join(f"{r[0]:.0f} s" for r in peer)
           + "; per alternating pair: " + ", ".join(f"{p:.2f}" for p in pairs) if peer else "")
        + ")",
        "",
        "Validation loss over the whole validation split (the last 10% of the text) in "
        "non-overlapping 64-character windows is lmlab's figure, and for nanoGPT that of the "
        "checkpoint its train.py saved, computed with its own model code; nanoGPT's train.py "
        "itself reports an estimate from 20 random batches. ms / iteration: lmlab's training "
        "steps alone; nanoGPT's median printed iteration time.",
        "",
        "Reproduce: `python benchmarks/shakespeare_char.py --nanogpt NANOGPT_CHECKOUT --write`",
    ])
    print(report)
    if args.write:
        update_section("shakespeare_char", report)


if __name__ == "__main__":
    main()
