"""`lmlab serve` from the command line: a real process answering the openai client, the key
from LMLAB_API_KEY, a warning when bound beyond loopback without a key, and a model that fails
to load ending the command with one line and exit status 2."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

import httpx2 as httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from lmlab.cli import main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_the_openai_client_with_the_key_from_the_environment(tiny_gpt_dir):
    port = free_port()
    env = {**os.environ, "LMLAB_API_KEY": "env-key", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lmlab", "serve", "--model", str(tiny_gpt_dir), "--port",
         str(port), "--model-name", "tiny", "--max-running", "4"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="env-key",
                               max_retries=0, timeout=10)
        deadline = time.monotonic() + 60
        while True:  # listening at once; 503 until the model has loaded
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.2)
        models = client.models.list()
        assert [m.id for m in models.data] == ["tiny"]
        out = client.completions.create(model="tiny", prompt="def", max_tokens=3,
                                        temperature=0)
        assert out.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="no",
                          max_retries=0).models.list()
    finally:
        process.terminate()
        process.wait(timeout=20)


class NoServer:
    """uvicorn.Server that does not bind anything: runs the app's startup only."""

    def __init__(self, config):
        self.config, self.should_exit = config, False

    def run(self):
        import asyncio

        async def lifespan():
            app = self.config.app
            async with app.router.lifespan_context(app):
                for _ in range(200):  # until the background load has finished
                    await asyncio.sleep(0.02)
                    if app.state.server.ready or app.state.server.load_error or \
                            self.should_exit:
                        break
        asyncio.run(lifespan())


def test_open_address_without_key_warns_and_a_failed_load_exits_2(tmp_path, monkeypatch,
                                                                  caplog, capsys):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(uvicorn, "Server", NoServer)
    monkeypatch.delenv("LMLAB_API_KEY", raising=False)
    with caplog.at_level(logging.WARNING):
        status = main(["serve", "--model", str(tmp_path), "--host", "0.0.0.0"])
    assert status == 2
    assert "without an API key" in caplog.text
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("lmlab serve: error: --model")


def test_weights_that_fail_to_load_are_one_line_and_the_server_exits(tiny_gpt_dir, tmp_path):
    """A truncated model.safetensors: the real server starts, the load fails, and stderr holds
    only the command's error line (not also the app's log line or a "listening" line)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((tiny_gpt_dir / name).read_bytes())
    (broken / "model.safetensors").write_bytes((tiny_gpt_dir / "model.safetensors").read_bytes()[:64])
    done = subprocess.run([sys.executable, "-m", "lmlab", "serve", "--model", str(broken),
                           "--port", str(free_port())], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("lmlab serve: error: --model") and "model.safetensors" in lines[0]
