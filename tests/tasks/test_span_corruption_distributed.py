"""Span-corruption pretraining under `torchrun --nproc_per_node=2` (gloo, CPU, DDP): the loss
trajectory and the weights equal one process with the combined batch, and the 2-rank checkpoint
resumes exactly in one process (batches are a function of (seed, step, row))."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmlab.data.prepare import prepare_dataset
from lmlab.recipes.pretraining import pretrain_recipe
from lmlab.tokenizer import Tokenizer

from conftest import write_word_documents
from torchrun_helpers import (  # tests/ is on sys.path (rootdir conftest, no __init__)
    assert_close_weights, assert_same_trajectory, copy_cut_back, torchrun_pretrain)

# 2 ranks × batch 2 × 2 micro-batches = the 8 rows of one process with batch 4 × 2; adam_eps
# 1e-6 for the reason assert_close_weights gives.
SHAPE = dict(objective="span", n_layer=1, n_head=2, n_embd=32, d_ff=64, block_size=24,
             dropout=0.0, max_steps=6, save_every=3, eval_every=3, eval_tokens=256, keep_last=0,
             warmup_steps=1, log_every=1, tensorboard=False, seed=5, grad_accum=2, lr=3e-3,
             min_lr=3e-4, adam_eps=1e-6)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("span_dist")
    texts = write_word_documents(root / "docs.jsonl")
    prepare_dataset(root / "docs.jsonl", tokenizer=Tokenizer.train_unigram(
        iterator=texts, vocab_size=80, extra_ids=10), out_dir=root / "ds", val_fraction=0.2)
    return root / "ds"


def single(data: Path, out: Path, *, resume: bool = False):
    recipe, cfg = pretrain_recipe(None, {"data": str(data), "batch_size": 4, **SHAPE})
    return recipe.run(cfg, run_dir=out, resume=resume, progress=False)


def assert_same_run(a: Path, b: Path) -> None:
    assert_same_trajectory(a, b, steps=SHAPE["max_steps"], keys=("train_loss", "val_loss"))
    assert_close_weights(a / "model.safetensors", b / "model.safetensors")


def test_two_ranks_equal_one_process_and_resume_exactly(dataset, tmp_path) -> None:
    single(dataset, tmp_path / "one")
    torchrun_pretrain(dataset, tmp_path / "two", {**SHAPE, "batch_size": 2})
    assert_same_run(tmp_path / "two", tmp_path / "one")
    resumed = copy_cut_back(tmp_path / "two", tmp_path / "resumed", step=3)
    assert single(dataset, resumed, resume=True).result.steps == 6
    assert_same_run(resumed, tmp_path / "one")
