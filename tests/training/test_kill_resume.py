"""A run killed with SIGKILL at any moment — mid-step, mid-evaluation, mid-checkpoint write —
and restarted with --resume ends with bit-identical weights and the same loss curve as a run
that was never interrupted (CPU, fp32, dropout on so that RNG states matter)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.data.prepare import prepare_dataset
from lmlab.tokenizer import Tokenizer

ARGS = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
        "--batch_size", "4", "--grad_accum", "2", "--dropout", "0.1", "--max_steps", "40",
        "--save_every", "4", "--eval_every", "10", "--eval_tokens", "512", "--keep_last", "2",
        "--warmup_steps", "4", "--log_every", "1", "--tensorboard", "false", "--seed", "5"]
# One thread, so that reductions sum in the same order in every process; no matmul-peak timing.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "LMLAB_MATMUL_PEAK_FLOPS": "1e11"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill")
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in mind suffer".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(300))
    (root / "a.txt").write_text(text)
    prepare_dataset([root / "a.txt"], tokenizer=Tokenizer.char_level(text), out_dir=root / "ds",
                    val_fraction=0.1)
    return root / "ds"


def command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmlab", "pretrain", "--data", str(data), "--out", str(out),
            "--no-progress", *ARGS, *extra]


def finish(data: Path, out: Path, *extra: str) -> None:
    done = subprocess.run(command(data, out, *extra), env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def logged_steps(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return -1
    return max((json.loads(x).get("step", -1) for x in lines[:-1]), default=-1)


def kill_when(data: Path, out: Path, ready, *, env: dict[str, str]) -> str:
    """Start a run, SIGKILL it once `ready(out)` holds; return what it was doing."""
    proc = subprocess.Popen(command(data, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ready(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    code = proc.wait()
    assert code == -signal.SIGKILL, f"the run ended by itself (exit {code}) before the kill"
    return ", ".join(p.name for p in sorted((out / "checkpoints").glob("*"))) \
        if (out / "checkpoints").is_dir() else "no checkpoints yet"


def train_losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]


def test_sigkill_at_random_moments_then_resume_is_bit_exact(dataset, tmp_path):
    reference = tmp_path / "reference"
    finish(dataset, reference)
    curve = train_losses(reference)
    assert [s for s, _ in curve] == list(range(1, 41))
    weights = (reference / "model.safetensors").read_bytes()

    rng = random.Random(4)  # fixed trial moments
    trials = [
        # mid-training, at a random step (and a random point within it)
        ("step", lambda out, k=rng.randrange(2, 38): logged_steps(out) >= k, ENV),
        ("step", lambda out, k=rng.randrange(2, 38): logged_steps(out) >= k, ENV),
        # inside a checkpoint write: each file of it takes 0.3 s longer to write
        ("checkpoint", lambda out: any((out / "checkpoints").glob(".tmp-step-*")),
         {**ENV, "LMLAB_TEST_SLOW_CHECKPOINT": "0.3"}),
    ]
    for i, (what, ready, env) in enumerate(trials):
        out = tmp_path / f"trial{i}"
        state = kill_when(dataset, out, ready, env=env)
        if what == "checkpoint":
            assert ".tmp-step-" in state, state  # killed with a half-written checkpoint
        # as a restarted job would: a kill inside the first checkpoint leaves none to resume
        finish(dataset, out, "--resume", "auto")
        assert train_losses(out) == curve, f"trial {i} ({what}; {state})"
        assert (out / "model.safetensors").read_bytes() == weights, f"trial {i} ({state})"
        assert not list((out / "checkpoints").glob(".tmp-*"))  # the half-written one is gone
