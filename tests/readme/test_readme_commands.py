"""Every README command runs (STYLE: a README command no test runs is a broken promise)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import run_cli
from lmlab import demo


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


def test_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
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
    # A second demo into the same directory replaces the first. In-process, on 2 + 20 files of
    # the standard library: what is tested is the replacing, not the corpus (the whole one costs
    # ~20 s of tokenizing and evaluating).
    (run / "stray.txt").write_text("left by the first run")
    root, files = demo.stdlib_files()
    val = [f for f in files if demo.is_validation(f.relative_to(root).as_posix())]
    monkeypatch.setattr(demo, "stdlib_files",
                        lambda: (root, sorted(val[:2] + [f for f in files if f not in val][:20])))
    code, out, err = run_cli(capsys, "demo", "--steps", "1", "--out", run, "--no-progress")
    assert code == 0, err
    assert "corpus: 20 train files, 2 validation files" in out
    assert not (run / "stray.txt").exists() and (run / "model.safetensors").is_file()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in records) == 1  # not the first run's 3
