"""Helpers of the `torchrun --nproc_per_node=2` tests (gloo, CPU): launch a 2-rank `lmlab
pretrain` (or any lmlab command), and compare its run with one process's — losses within 1e-5, weights within
rounding."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmlab.training.checkpoint import list_checkpoints

# One intra-op thread per rank (2 ranks on 2 cores); a fixed matmul peak skips its measurement.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "LMLAB_MATMUL_PEAK_FLOPS": "1e11"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_pretrain(data: Path, out: Path, config: dict, *extra: str,
                      timeout: float = 240) -> subprocess.CompletedProcess:
    """`lmlab pretrain` on 2 ranks with `config` as --key=value flags; fails the test with the
    end of stderr when it does not exit 0."""
    flags = [f"--{key}={value}" for key, value in config.items()]
    return torchrun_lmlab("pretrain", "--data", str(data), "--out", str(out), "--no-progress",
                          *flags, *extra, timeout=timeout)


def torchrun_lmlab(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`lmlab ARGS…` on 2 ranks; fails the test with the end of stderr when it does not exit 0."""
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", "-m", "lmlab", *args],
        env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path, keys=("train_loss", "val_loss")) -> dict[tuple[int, str], float]:
    return {(r["step"], k): r[k] for r in records(out) for k in keys if k in r}


def assert_same_trajectory(a: Path, b: Path, *, steps: int,
                           keys=("train_loss", "val_loss")) -> None:
    la, lb = losses(a, keys), losses(b, keys)
    assert la.keys() == lb.keys()
    assert len([k for k in la if k[1] == "train_loss"]) == steps
    for key, value in la.items():
        assert abs(value - lb[key]) <= 1e-5 * abs(value), (key, value, lb[key])


def assert_close_weights(a: Path, b: Path, rtol: float = 1e-4) -> None:
    """Weights equal up to the rounding of a 2-rank reduction against one process's sum.
    Runs compared here use adam_eps 1e-6, not 1e-8: AdamW divides each gradient element by
    its own RMS, so an element whose true gradient is ~0 (a key bias's is exactly 0: softmax
    ignores it) steps by its rounding noise, which differs between the two runs and between
    CPUs — at 1e-8 such elements drift to the edge of this tolerance in six steps."""
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=rtol, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def copy_cut_back(run: Path, to: Path, step: int) -> Path:
    """A copy of `run` whose newest checkpoint is the one at `step` (later ones removed): what
    a run interrupted after that checkpoint leaves, for `--resume` to continue."""
    shutil.copytree(run, to)
    for ckpt in list_checkpoints(to):
        if ckpt.step > step:
            shutil.rmtree(ckpt.path)
    return to
