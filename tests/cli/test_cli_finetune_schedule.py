"""A fine-tuning schedule too short to learn from its data is warned about once, before
training, saying what to change; an epoch-based run prints one line per epoch's evaluation."""

from __future__ import annotations

import logging
import re

from lmlab.config import from_dict
from lmlab.recipes.classification import FinetuneClassificationConfig
from lmlab.recipes.finetuning import MIN_STEPS, short_schedule
from test_cli_errors import run_cli  # same folder

from conftest import sentiment_rows, write_splits


def config(**values) -> FinetuneClassificationConfig:
    return from_dict(FinetuneClassificationConfig, values)


def test_the_warning_counts_the_steps_and_its_advice_is_enough():
    cfg = config(epochs=2, batch_size=32)
    assert short_schedule(cfg, examples=300, global_batch=32) == (
        "only 20 optimizer steps (300 examples / batch 32 × 2 epochs): too few to learn much; "
        "raise epochs or lower batch_size, e.g. --epochs 3 --batch_size 8")
    assert short_schedule(config(epochs=3, batch_size=8), examples=300, global_batch=8) is None
    # grad_accum (or processes) multiply the batch; lowering batch_size alone may be enough
    assert "(1000 examples / batch 32 × 2 × 2 epochs)" in \
        short_schedule(cfg, examples=1000, global_batch=64)
    assert short_schedule(cfg, examples=1000, global_batch=32).endswith("e.g. --batch_size 16")
    assert short_schedule(cfg, examples=50 * MIN_STEPS, global_batch=32) is None


def test_a_short_finetune_warns_once_and_prints_each_epoch(capsys, caplog, tiny_bert_dir,
                                                           tmp_path):
    files = write_splits(tmp_path, {"train": sentiment_rows(96, 0),
                                    "validation": sentiment_rows(32, 1)})
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        code, out, _ = run_cli(capsys, "finetune", "classification", "--model", tiny_bert_dir,
                               "--train", files / "train.jsonl", "--validation",
                               files / "validation.jsonl", "--text_field", "sentence",
                               "--out", tmp_path / "run", "--max_length", "32",
                               "--batch_size", "16", "--epochs", "2")
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["only 12 optimizer steps (96 examples / batch 16 × 2 epochs): too few "
                        "to learn much; raise epochs or lower batch_size, e.g. --epochs 9 "
                        "--batch_size 8"]
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert re.fullmatch(r"epoch 1/2: train loss \d+\.\d{4}, .*val_accuracy [\d.]+.* \(best\)",
                        epochs[0])
