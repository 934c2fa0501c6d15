"""`lmlab demo`: the whole life of a small GPT on a corpus every Python install has — its own
standard library — within a time budget: BPE tokenizer, data preparation, pretraining with
evaluation, a Hugging Face-layout checkpoint, a loss curve, and continuations of code prompts."""

from __future__ import annotations

import hashlib
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.config import from_dict
from lmlab.data.prepare import prepare_dataset
from lmlab.errors import ConfigError, DataError
from lmlab.generation import generate
from lmlab.models import from_pretrained
from lmlab.recipes.causal_lm import CausalLMConfig, pretrain_causal_lm
from lmlab.recipes.pretraining import PretrainResult
from lmlab.tokenizer import Tokenizer

PROMPTS = ("def fibonacci(n):\n", "class Stack:\n", "import os\n\n\ndef read_config(path):\n")
VAL_FRACTION = 0.02
# Test suites are skipped: they are large and repetitive, and the library code is what we want
# the model to imitate.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
MARKER = "demo.json"


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        f for f in root.rglob("*.py")
        if not SKIP_DIRS.intersection(f.relative_to(root).parts[:-1]) and f.is_file()
    )
    if not files:
        raise DataError(f"{root}: no .py files found in the standard library directory")
    return root, files


def is_validation(relative: str) -> bool:
    """By file, from a hash of the path relative to the stdlib: the same split everywhere."""
    digest = hashlib.sha256(relative.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < VAL_FRACTION


# Validation every EVAL_EVERY steps (the whole split, ~1 s each) draws the curve of loss.png
# with several points, not a line between "before" and "after".
EVAL_EVERY = 200


def demo_config(*, data: str, minutes: float | None, steps: int | None) -> CausalLMConfig:
    return from_dict(CausalLMConfig, dict(
        data=data, n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=32,
        max_steps=steps or 100_000, lr=2e-3, min_lr=2e-4, warmup_steps=100, weight_decay=0.1,
        beta2=0.99, eval_every=EVAL_EVERY, eval_tokens=None, save_every=0, keep_last=1,
        max_minutes=None if steps else minutes, tensorboard=True,
    ))


@dataclass
class Continuation:
    prompt: str
    greedy: str
    sampled: str


@dataclass
class DemoResult:
    pretrain: PretrainResult
    continuations: list[Continuation]
    seconds: float
    train_files: int
    val_files: int


def run_demo(*, out: str | Path, minutes: float = 5.0, steps: int | None = None,
             progress: bool = True, vocab_size: int = 2048) -> DemoResult:
    if minutes <= 0:
        raise ConfigError(f"--minutes must be > 0, got {minutes}")
    if steps is not None and steps <= 0:
        raise ConfigError(f"--steps must be positive, got {steps}")
    demo_config(data=str(Path(out) / "data"), minutes=minutes, steps=steps)  # its checks, now
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists():
        if not (out / MARKER).is_file():
            raise ConfigError(f"--out {out}: exists and is not an lmlab demo run; choose another")
        shutil.rmtree(out)  # a previous demo: start afresh
    out.mkdir(parents=True)
    (out / MARKER).write_text('{"corpus": "python stdlib"}\n')

    root, files = stdlib_files()
    val = [f for f in files if is_validation(f.relative_to(root).as_posix())]
    train = [f for f in files if not is_validation(f.relative_to(root).as_posix())]
    data_dir = out / "data"
    try:
        tokenizer = Tokenizer.train_bpe(train, vocab_size=vocab_size)
        prepare_dataset(train, tokenizer=tokenizer, out_dir=data_dir, val_sources=val)
    except BaseException:  # no half-made demo run left behind (pretraining undoes its own part)
        shutil.rmtree(out, ignore_errors=True)
        raise

    # The loop fits training and its evaluations into what is left; keep ~25 s for loading,
    # saving, the loss plot, decoding, and this shared machine's drift (a 5-minute run with a
    # 10 s reserve ended at 321 s).
    remaining = minutes - (time.perf_counter() - t0) / 60
    train_minutes = max(0.1, remaining - 25 / 60)
    cfg = demo_config(data=str(data_dir), minutes=train_minutes, steps=steps)
    result = pretrain_causal_lm(cfg, run_dir=out, progress=progress)

    model = from_pretrained(out)
    tokenizer = Tokenizer.from_pretrained(out)
    continuations = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        greedy = generate(model, ids, max_new_tokens=64, eos_token_id=[])
        sampled = generate(model, ids, max_new_tokens=64, do_sample=True, top_p=0.9,
                           temperature=0.8, seed=0, eos_token_id=[])
        continuations.append(Continuation(
            prompt=prompt,
            greedy=tokenizer.decode(greedy[0, ids.shape[1]:].tolist()),
            sampled=tokenizer.decode(sampled[0, ids.shape[1]:].tolist()),
        ))
    return DemoResult(pretrain=result, continuations=continuations,
                      seconds=time.perf_counter() - t0, train_files=len(train), val_files=len(val))
