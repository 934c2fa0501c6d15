"""The console's line per evaluation: where the run is (epochs for epoch-based runs), the mean
training loss since the previous evaluation, the figures, and the best marked."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import torch

from lmlab.training.loop import train
from test_early_stopping import ScriptedMetrics  # same folder
from test_loop import corpus, loop_config, make_task, tiny_model

CPU = torch.device("cpu")


def test_each_evaluation_is_one_line_with_epoch_train_loss_figures_and_best(tmp_path, capsys):
    task = ScriptedMetrics(make_task(corpus()), [0.5, 0.7, 0.6, 0.8])
    cfg = dataclasses.replace(
        loop_config(max_steps=20, eval_every=5, save_every=5, metric="accuracy", keep_last=1,
                    eval_at_start=False, progress=True), steps_per_epoch=5)
    train(tiny_model(), task, cfg, run_dir=tmp_path, device=CPU)
    lines = capsys.readouterr().out.splitlines()
    pattern = r"epoch (\d)/4: train loss (\d+\.\d{4}), accuracy ([\d.]+), val_loss 1( \(best\))?"
    found = [re.fullmatch(pattern, line) for line in lines]
    assert all(found) and len(found) == 4, lines
    assert [(m[1], m[3], bool(m[4])) for m in found] == [
        ("1", "0.5", True), ("2", "0.7", True), ("3", "0.6", False), ("4", "0.8", True)]
    # the train loss is the mean over the epoch's steps (log_every=1 logs every one)
    records = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    for epoch, match in enumerate(found):
        expected = sum(losses[5 * epoch:5 * epoch + 5]) / 5
        assert abs(float(match[2]) - expected) < 1e-4


def test_step_based_runs_count_steps_and_without_a_bar_the_line_is_logged(tmp_path, capsys,
                                                                          caplog):
    caplog.set_level(logging.INFO, logger="lmlab")
    task = ScriptedMetrics(make_task(corpus()), [0.5, 0.4])
    train(tiny_model(), task, loop_config(max_steps=10, eval_every=5, metric="accuracy",
                                          progress=True), run_dir=tmp_path / "a", device=CPU)
    lines = capsys.readouterr().out.splitlines()  # the evaluation before training is not one
    assert [line.split(":")[0] for line in lines] == ["step 5/10", "step 10/10"]
    assert lines[0].endswith("(best)") is False and "accuracy 0.4" in lines[0]
    train(tiny_model(), ScriptedMetrics(make_task(corpus()), [0.5]),
          loop_config(max_steps=10, eval_every=5, metric="accuracy"), run_dir=tmp_path / "b",
          device=CPU)
    assert capsys.readouterr().out == ""  # no bar: the line goes to the log (stderr in the CLI)
    assert [r.getMessage().split(":")[0] for r in caplog.records
            if r.getMessage().startswith("step ")] == ["step 5/10", "step 10/10"]
