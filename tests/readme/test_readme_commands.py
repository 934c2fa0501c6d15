"""Every README command runs (STYLE: a README command no test runs is a broken promise)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def lmlab(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmlab", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_quick_start_has_exactly_the_two_commands_ci_runs():
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", README, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert commands == [
        "bash scripts/setup.sh && .venv/bin/lmlab demo",
        "bash scripts/setup.sh && .venv/bin/python -m pytest -q",
    ]
    assert commands[1].split("&& ", 1)[1] in (ROOT / ".ci/run").read_text()


def test_demo_runs_end_to_end(tmp_path):
    """`lmlab demo` (into its default runs/demo), shortened to a few steps: corpus, tokenizer,
    training, checkpoint, plot, continuations of every prompt. (The README's other commands run
    as written in test_docs_commands.py.)"""
    result = lmlab("demo", "--steps", "3", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "validation before training" in out and "validation after training" in out
    for prompt in ("def fibonacci(n):", "class Stack:"):
        assert out.count(prompt) == 2  # greedy and sampled
    run = tmp_path / "runs" / "demo"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss.png", "metrics.jsonl"):
        assert (run / name).is_file(), name
    # a second demo into the same directory replaces the first
    assert lmlab("demo", "--steps", "1", "--out", run, "--no-progress", cwd=tmp_path).returncode == 0
