"""Masked LM + NSP under `torchrun --nproc_per_node=2` (gloo, CPU, DDP): the loss trajectory and
the weights equal one process with the combined batch — the M/P weighting of NSP is global — and
the 2-rank checkpoint resumes bit-exactly in one process (batches are a function of (seed, step))."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmlab.data.prepare import prepare_dataset
from lmlab.tokenizer import Tokenizer
from lmlab.recipes.pretraining import pretrain_recipe

from conftest import write_word_documents
from torchrun_helpers import (  # tests/ is on sys.path (rootdir conftest, no __init__)
    assert_close_weights, assert_same_trajectory, copy_cut_back, torchrun_pretrain)

# 2 ranks × batch 2 × 2 micro-batches = the 8 pairs of one process with batch 4 × 2.
# adam_eps 1e-6 (BERT's): see assert_close_weights. At 1e-8 the weights came within 0.15-0.47
# of its tolerance here (seeds 1-10) and crossed it on CI's machine; at 1e-6, 0.01-0.19.
SHAPE = dict(objective="mlm+nsp", whole_word_mask=True, n_layer=1, n_head=2, n_embd=32,
             block_size=24, dropout=0.0, max_steps=6, save_every=3, eval_every=3,
             eval_tokens=256, keep_last=0, warmup_steps=1, log_every=1, tensorboard=False,
             seed=5, grad_accum=2, lr=3e-3, min_lr=3e-4, adam_eps=1e-6)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlm_dist")
    texts = write_word_documents(root / "docs.jsonl")
    prepare_dataset(root / "docs.jsonl", tokenizer=Tokenizer.train_wordpiece(
        iterator=texts, vocab_size=60), out_dir=root / "ds", val_fraction=0.2)
    return root / "ds"


def single(data: Path, out: Path, *, resume: bool = False):
    recipe, cfg = pretrain_recipe(None, {"data": str(data), "batch_size": 4, **SHAPE})
    return recipe.run(cfg, run_dir=out, resume=resume, progress=False)


def assert_same_run(a: Path, b: Path) -> None:
    assert_same_trajectory(a, b, steps=SHAPE["max_steps"],
                           keys=("train_loss", "val_loss", "val_nsp_acc"))
    assert_close_weights(a / "model.safetensors", b / "model.safetensors")


def test_two_ranks_equal_one_process_and_resume_exactly(dataset, tmp_path) -> None:
    single(dataset, tmp_path / "one")
    torchrun_pretrain(dataset, tmp_path / "two", {**SHAPE, "batch_size": 2})
    assert_same_run(tmp_path / "two", tmp_path / "one")
    resumed = copy_cut_back(tmp_path / "two", tmp_path / "resumed", step=3)
    assert single(dataset, resumed, resume=True).result.steps == 6
    assert_same_run(resumed, tmp_path / "one")
