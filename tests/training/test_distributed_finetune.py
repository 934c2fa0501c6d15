"""`torchrun --nproc_per_node=2 -m lmlab finetune` (gloo, CPU): each rank trains on its share of
every batch, so two ranks of batch 4 follow one process of batch 8 — the same training loss at
every step, the same validation figures after every epoch (rank 0 evaluates) and the same final
weights — and only rank 0 writes. A full classification fine-tune, and an SFT run with LoRA
(DDP over a frozen base). The training files have an odd number of examples: the last step of
each epoch holds one, and rank 1 trains a stand-in without targets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import sentiment_rows, write_splits
from lmlab.config import parse_overrides
from lmlab.recipes import find_recipe, load_recipe_config
from torchrun_helpers import assert_close_weights, records, torchrun_lmlab

# adam_eps 1e-6: see torchrun_helpers.assert_close_weights.
COMMON = ["--epochs=2", "--warmup_ratio=0.1", "--seed=0", "--log_every=1", "--adam_eps=1e-6",
          "--max_length=32"]


@pytest.fixture(scope="module")
def bert_without_dropout(tiny_bert_dir, tmp_path_factory) -> Path:
    """tiny_bert_dir with dropout off: with it, ranks draw other masks than one process."""
    directory = tmp_path_factory.mktemp("bert_nodrop") / "bert"
    shutil.copytree(tiny_bert_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def conversations(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = "good great fine happy bad awful sad poor".split()
    return [{"messages": [{"role": "user", "content": w},
                          {"role": "assistant", "content": f"{w} {w}"}]}
            for w in (rng.choice(words) for _ in range(n))]


def single(task: str, flags: list[str], out: Path):
    """The reference: the same flags in one process (no torchrun in the environment)."""
    recipe = find_recipe(task, command="finetune")
    cfg = load_recipe_config(recipe, None, parse_overrides(flags))
    return recipe.run(cfg, run_dir=out, progress=False)


def assert_same_run(two: Path, one: Path, *, val_keys: tuple[str, ...]) -> None:
    a, b = records(two), records(one)
    train = [(r["step"], r["train_loss"]) for r in a if "train_loss" in r]
    assert [s for s, _ in train] == [r["step"] for r in b if "train_loss" in r]  # rank 0's only
    for (step, loss), other in zip(train, [r["train_loss"] for r in b if "train_loss" in r]):
        assert loss == pytest.approx(other, rel=1e-5), step
    evals_a = [r for r in a if val_keys[0] in r]
    evals_b = [r for r in b if val_keys[0] in r]
    assert [r["step"] for r in evals_a] == [r["step"] for r in evals_b] and len(evals_a) == 2
    for ra, rb in zip(evals_a, evals_b):
        for key in val_keys:
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)


def test_two_ranks_classify_like_one_process_with_the_combined_batch(
        bert_without_dropout, tmp_path):
    data = write_splits(tmp_path, {"train": sentiment_rows(49, 0),
                                   "validation": sentiment_rows(24, 1)})
    flags = ["--model", str(bert_without_dropout), "--train", str(data / "train.jsonl"),
             "--validation", str(data / "validation.jsonl"), "--text_field=sentence",
             "--lr=2e-3", *COMMON]
    done = torchrun_lmlab("finetune", "classification", "--out", str(tmp_path / "two"),
                          "--no-progress", *flags, "--batch_size=4", timeout=120)
    assert done.stdout.count("resolved config:") == 1  # only rank 0 speaks
    one = single("classification", [*flags, "--batch_size=8"], tmp_path / "one")
    assert one.train.steps == 14  # 49 examples / 8 → 7 steps per epoch, the last of one
    assert_same_run(tmp_path / "two", tmp_path / "one",
                    val_keys=("val_loss", "val_accuracy", "val_macro_f1"))
    assert_close_weights(tmp_path / "two" / "model.safetensors",
                         tmp_path / "one" / "model.safetensors")
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["validation"]["val_accuracy"] == one.validation["val_accuracy"]
    assert len((tmp_path / "two" / "predictions_validation.jsonl").read_text().splitlines()) == 24


def test_two_ranks_sft_with_lora_like_one_process(tiny_gpt_dir, tmp_path):
    data = write_splits(tmp_path, {"train": conversations(25, 0),
                                   "validation": conversations(8, 1)})
    flags = ["--model", str(tiny_gpt_dir), "--train", str(data / "train.jsonl"),
             "--validation", str(data / "validation.jsonl"), "--lr=3e-3", "--lora.r=4",
             "--samples=0", *COMMON]
    torchrun_lmlab("finetune", "sft", "--out", str(tmp_path / "two"), "--no-progress", *flags,
                   "--batch_size=2", timeout=120)
    one = single("sft", [*flags, "--batch_size=4"], tmp_path / "one")
    assert one.train.steps == 14  # 25 examples / 4 → 7 steps per epoch, the last of one
    assert_same_run(tmp_path / "two", tmp_path / "one", val_keys=("val_loss",))
    assert_close_weights(tmp_path / "two" / "adapter_model.safetensors",
                         tmp_path / "one" / "adapter_model.safetensors")
