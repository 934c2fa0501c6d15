"""scripts/gpu_smoke.py without a GPU: its step table is well-formed (`--list`), and on a
machine without CUDA it says so and exits with its own status (3), running nothing. The steps
themselves need a GPU (docs/training.md, "GPU")."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_smoke.py"


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_smoke", None)


def test_the_step_table_is_well_formed(smoke):
    names = [s.name for s in smoke.STEPS]
    assert len(names) == len(set(names))
    for i, step in enumerate(smoke.STEPS):
        assert step.timeout > 0 and step.what and callable(step.run)
        assert set(step.needs) <= set(names[:i]), f"{step.name} needs a later or unknown step"
    assert set(smoke.CHECKS) <= set(names)  # every in-process check is some step's
    # what the issue asks the script to cover, by step
    for needed in ("pretrain-gpt-bf16", "pretrain-gpt-fp32", "pretrain-bert-bf16", "resume",
                   "ddp-nccl", "fsdp-nccl", "finetune-classification", "finetune-qa",
                   "decode-parity", "decode-all", "bf16-model", "no-cpu-ops", "cli-generate",
                   "cli-serve"):
        assert needed in names
    # the required steps fit the five minutes with room: limits are ceilings, not estimates
    assert [s.name for s in smoke.STEPS if s.optional] == ["pretrain-gpt-compile"]


def test_list_prints_every_step(smoke):
    out = subprocess.run([sys.executable, SCRIPT, "--list"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == [s.name for s in smoke.STEPS]
    assert all(r.count("|") == 5 for r in rows)  # no stray '|' inside a cell


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_without_cuda_it_says_so_and_exits_3(smoke, tmp_path):
    out = subprocess.run([sys.executable, SCRIPT, "--workdir", tmp_path / "w"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == smoke.NO_GPU_EXIT == 3
    assert "no CUDA device" in out.stdout
    assert not (tmp_path / "w").exists()  # nothing was run


def test_the_cpu_op_detector_sees_a_cpu_matmul_and_ignores_small_ops(smoke):
    with smoke.cpu_op_detector() as mode:
        torch.ones(4, 4) @ torch.ones(4, 4)  # bookkeeping-sized: ignored
    assert mode.found == []
    with smoke.cpu_op_detector() as mode:
        torch.nn.functional.linear(torch.ones(8, 128), torch.ones(256, 128))
    assert mode.found and mode.found[0].startswith(("linear", "mm", "addmm", "t"))
