"""Every command the README and docs/*.md show runs, exactly as written, in order (STYLE: a
documented command no test runs is a broken promise).

Each ```bash fence is a list of commands (lines joined at a trailing backslash) and each ```python
fence one program; they run in the order of the page, pages in reading order, in one sandbox
that plays the user's checkout:

- `configs/` holds the shipped presets, shrunk (the commands stay as written; only what the
  presets set is smaller): pretraining to a few steps of a one-layer, width-64 model (at the
  shipped widths `eval perplexity` of the BERT scores every token of its excerpt through a
  4-layer, width-256 model: a minute or more on 2 cores), fine-tuning to one epoch, SQuAD to the
  first articles of each split; and the prompt sets of `configs/prompts/` as they are;
- `../shared/data/` holds excerpts of the real datasets (the first rows of each file; for SQuAD
  the first paragraph and question of every article), so every file a command names exists;
- the files a page asks the user to bring (`my_sentences.jsonl`, `corpus/`, …) are made here
  from those excerpts;
- `lmlab`, `python` and `.venv/bin/…` are this interpreter.

A fence that cannot run here is marked in the page, on the line before it, with
`<!-- not-run: REASON -->` (installing, several machines, a benchmark that rewrites
BENCHMARKS.md), optionally followed by `<!-- stand-in: COMMAND -->` when later commands need what
it makes. `lmlab serve` starts in the background until the page ends; its port is swapped for a
free one. A non-zero exit fails the test with the command and its stderr.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
PAGES = ["README.md", "docs/training.md", "docs/finetuning.md", "docs/generation.md",
         "docs/serving.md", "docs/architecture.md", "docs/config-reference.md",
         "docs/evaluation.md", "docs/translation.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not-run: (.+?) -->")
STAND_IN = re.compile(r"<!-- stand-in: (.+?) -->")

# The budgets of the shipped presets, shrunk: the commands run as written on small data.
PRETRAIN_BUDGET = {"max_steps": 3, "eval_every": 0, "eval_tokens": 512, "save_every": 2,
                   "log_every": 1}
# ... and their models (a key is set only where the preset has it: GPT, BERT and T5 share these)
PRETRAIN_SHAPE = {"n_layer": 1, "n_head": 2, "n_embd": 64, "d_kv": 32, "d_ff": 128}
FINETUNE_BUDGET = {"epochs": 1, "samples": 1, "sample_max_new_tokens": 8}
# ... and the shape of a T5 the translation presets build from scratch
SCRATCH_SHAPE = {"vocab_size": 400, "d_model": 64, "d_kv": 32, "num_heads": 2, "d_ff": 128,
                 "num_layers": 1}
ROWS = 24  # rows kept of every JSONL file; characters kept of text files: 1000 × ROWS


@dataclass
class Block:
    page: str
    line: int
    language: str
    text: str
    not_run: str | None
    stand_in: str | None

    def commands(self) -> list[str]:
        """The shell commands of a bash fence: continuation lines joined, comments dropped."""
        joined = re.sub(r"\\\n\s*", " ", self.text)
        return [line for line in joined.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]


def blocks(page: str) -> list[Block]:
    text = (ROOT / page).read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        language = match.group(1)
        if language not in ("bash", "python"):
            continue
        before = text[:match.start()].rstrip("\n").rsplit("\n\n", 1)[-1]  # the lines just above
        not_run, stand_in = NOT_RUN.search(before), STAND_IN.search(before)
        found.append(Block(page, text.count("\n", 0, match.start()) + 1, language,
                           match.group(2), not_run and not_run.group(1),
                           stand_in and stand_in.group(1)))
    return found


def test_every_fence_of_a_page_is_run_or_says_why_not():
    """The pages in PAGES are all the documentation; a not-run mark gives its reason."""
    assert {p for p in PAGES} == {"README.md"} | {f"docs/{p.name}" for p in
                                                 (ROOT / "docs").glob("*.md")}
    for page in PAGES:
        for block in blocks(page):
            if block.not_run is not None:
                assert len(block.not_run) > 10, (block.page, block.line)


# -- the sandbox ---------------------------------------------------------------------------------
def excerpt_data(source: Path, target: Path) -> None:
    """The first rows of every dataset file, at the same relative paths."""
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                out.write_text("".join(line for _, line in zip(range(ROWS), f)), encoding="utf-8")
        elif path.suffix == ".json" and path.parent.name.startswith("squad"):
            squad = json.loads(path.read_text(encoding="utf-8"))
            for article in squad["data"]:
                article["paragraphs"] = article["paragraphs"][:1]
                article["paragraphs"][0]["qas"] = article["paragraphs"][0]["qas"][:1]
            out.write_text(json.dumps(squad), encoding="utf-8")
        elif path.suffix in (".txt", ".tokens", ".md", ".json"):
            with path.open(encoding="utf-8", newline="") as f:
                out.write_text(f.read(1000 * ROWS), encoding="utf-8", newline="")


def shrink_configs(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        if path.parent.name == "pretrain":
            cfg.update(PRETRAIN_BUDGET)
            cfg.update({k: v for k, v in PRETRAIN_SHAPE.items() if k in cfg})
            cfg.pop("max_minutes", None)
            cfg["vocab_size"] = min(cfg.get("vocab_size", 512), 512)
        else:
            cfg.update({k: v for k, v in FINETUNE_BUDGET.items() if k in cfg or k == "epochs"})
            for key in ("train_titles", "validation_titles", "test_titles"):  # SQuAD's splits
                if cfg.get(key):
                    cfg[key] = cfg[key][:4]
            if isinstance(cfg.get("scratch"), dict):  # translation from scratch
                cfg["scratch"].update(SCRATCH_SHAPE)
                cfg.pop("max_minutes", None)
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(cfg, sort_keys=False))


def user_files(checkout: Path, data: Path) -> None:
    """The files the pages ask the user to bring, made from the excerpts."""
    sst2 = (data / "sst2" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    sentences = [json.dumps({"sentence": json.loads(line)["sentence"]}) for line in sst2[:8]]
    (checkout / "my_sentences.jsonl").write_text("\n".join(sentences) + "\n")
    (checkout / "new.jsonl").write_text("\n".join(sentences) + "\n")
    for name, rows in (("train.jsonl", sst2[:8]), ("validation.jsonl", sst2[16:20]),
                       ("other.jsonl", sst2[20:24])):
        (checkout / name).write_text("\n".join(rows) + "\n")
    shakespeare = (data / "tiny_shakespeare" / "input.txt").read_text(encoding="utf-8")
    for folder, name, part in (("corpus", "a.txt", 0), ("corpus", "b.txt", 1),
                               ("more", "c.txt", 2)):
        (checkout / folder).mkdir(exist_ok=True)
        (checkout / folder / name).write_text(shakespeare[part * 6000:(part + 1) * 6000])
    pairs = (data / "multi30k_en_de" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    (checkout / "sentences.en").write_text("".join(json.loads(line)["en"] + "\n"
                                                   for line in pairs[:4]))
    (checkout / "notes.jsonl").write_text("\n".join(
        json.dumps({"text": shakespeare[i:i + 400]}) for i in range(18000, 24000, 400)) + "\n")


def make_sandbox(root: Path) -> tuple[Path, dict[str, str]]:
    checkout, data = root / "checkout", root / "shared" / "data"
    checkout.mkdir(parents=True)
    excerpt_data(SHARED, data)
    shrink_configs(ROOT / "configs", checkout / "configs")
    shutil.copytree(ROOT / "configs" / "prompts", checkout / "configs" / "prompts")  # as shipped
    user_files(checkout, data)
    bin_dir = checkout / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, program in (("lmlab", f'"{sys.executable}" -m lmlab'),
                          ("python", f'"{sys.executable}"')):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec {program} "$@"\n')
        shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return checkout, env


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def start_server(command: str, *, cwd: Path, env: dict[str, str], port: str) -> subprocess.Popen:
    server = subprocess.Popen(["bash", "-c", "exec " + command], cwd=cwd, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as reply:
                if reply.status == 200:
                    return server
        except OSError:
            pass
        assert server.poll() is None, f"{command}\n{server.stderr.read()}"
        assert time.monotonic() < deadline, f"{command}: not ready in 120 s"
        time.sleep(0.2)


def run_one(block: Block, command: str, *, cwd: Path, env: dict[str, str]) -> str:
    argv = ["bash", "-c", command] if block.language == "bash" else [sys.executable, "-c", command]
    done = subprocess.run(argv, cwd=cwd, env=env, input="Hello\n", capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (f"{block.page}:{block.line}: exit {done.returncode}\n"
                                  f"$ {command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done.stdout


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent (the pages' commands "
                                                "read its datasets)")
def test_every_documented_command_runs_as_written(tmp_path):
    checkout, env = make_sandbox(tmp_path)
    ran = []
    for page in PAGES:
        port, servers = free_port(), []
        try:
            for block in blocks(page):
                if block.not_run is not None:
                    if block.stand_in:
                        run_one(block, block.stand_in, cwd=checkout, env=env)
                    continue
                for command in (block.commands() if block.language == "bash" else [block.text]):
                    command = command.replace("8000", port)
                    if block.language == "bash" and shlex.split(command)[1:2] == ["serve"]:
                        servers.append(start_server(command, cwd=checkout, env=env, port=port))
                    else:
                        run_one(block, command, cwd=checkout, env=env)
                    ran.append(f"{page}:{block.line}")
        finally:
            for server in servers:
                server.terminate()
                server.wait(timeout=30)
    assert len(ran) >= 15, ran
