"""Every README command runs (STYLE: a README command no test runs is a broken promise)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tiny_shakespeare" / "input.txt"


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
    training, checkpoint, plot, continuations of every prompt; then the README's library snippet,
    verbatim, on that run."""
    result = lmlab("demo", "--steps", "3", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "validation before training" in out and "validation after training" in out
    for prompt in ("def fibonacci(n):", "class Stack:"):
        assert out.count(prompt) == 2  # greedy and sampled
    run = tmp_path / "runs" / "demo"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss.png", "metrics.jsonl"):
        assert (run / name).is_file(), name
    snippet = re.search(r"## Using the library.*?```python\n(.*?)```", README, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def fibonacci(n):")
    assert (tmp_path / "my-model" / "model.safetensors").is_file()
    serving_commands_run(tmp_path)
    # a second demo into the same directory replaces the first
    assert lmlab("demo", "--steps", "1", "--out", run, "--no-progress", cwd=tmp_path).returncode == 0


def serving_commands_run(cwd: Path) -> None:
    """The README's "Serving" section on the demo's model, verbatim but for the port (a free
    one, so that the test never collides with a server already on 8000): the serve command,
    the curl command and the openai snippet."""
    import shutil
    import socket
    import time
    import urllib.request

    section = re.search(r"## Serving\n(.*?)\n## ", README, re.S).group(1)
    serve, curl = re.findall(r"```bash\n(.*?)```", section, re.S)
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    serve = serve.strip().replace(".venv/bin/lmlab", f"{sys.executable} -m lmlab")
    server = subprocess.Popen(serve.replace("8000", port).split(), cwd=cwd,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, server.stderr.read().decode()
            assert time.monotonic() < deadline, "lmlab serve did not become ready"
            time.sleep(0.2)
        if shutil.which("curl"):
            done = subprocess.run(["bash", "-c", curl.replace("8000", port)], cwd=cwd,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["choices"][0]["text"]
        done = subprocess.run([sys.executable, "-c", snippet.replace("8000", port)], cwd=cwd,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip()
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="../shared/data (tiny Shakespeare) is absent")
def test_shakespeare_example_commands(tmp_path):
    """The README's pretrain + generate example, shortened with --max_steps."""
    run = tmp_path / "shakespeare"
    result = lmlab("pretrain", "--config", ROOT / "configs/pretrain/shakespeare_char.yaml",
                   "--data", SHAKESPEARE, "--out", run, "--max_steps", "20", "--eval_every", "0",
                   "--eval_tokens", "2048", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = lmlab("generate", "--model", run, "--prompt", "ROMEO:", "--do-sample", "--top-k", "20",
                   "--seed", "0", "--max-new-tokens", "20", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:") and len(result.stdout) > len("ROMEO:") + 10
