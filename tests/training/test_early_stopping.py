"""Early stopping, the best checkpoint, restore_best and the learning-rate schedules."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmlab.errors import ConfigError
from lmlab.training.checkpoint import best_checkpoint, list_checkpoints
from lmlab.training.early_stopping import BestTracker
from lmlab.training.loop import LoopConfig, OptimConfig, train
from lmlab.training.schedule import lr_at
from test_loop import corpus, loop_config, make_task, tiny_model  # same folder

CPU = torch.device("cpu")


class ScriptedMetrics:
    """A real causal-LM task whose evaluations return scripted accuracies, one per call."""

    def __init__(self, task, values):
        self.task, self.values, self.calls = task, list(values), 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def evaluate(self, model, *, final=False):
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return {"accuracy": value, "val_loss": 1.0}


def scripted_config(**overrides) -> LoopConfig:
    values = dict(max_steps=50, eval_every=5, save_every=5, keep_last=1, metric="accuracy",
                  patience=2, min_delta=0.01)
    values.update(overrides)
    return loop_config(**values)


def test_early_stopping_counts_evaluations_without_enough_improvement(tmp_path):
    # evaluations at steps 0, 5, 10, 15, 20, …: the best is 0.60 at step 10; 0.60 (no change)
    # and 0.605 (better by only 0.005 <= min_delta) are two evaluations without improvement.
    task = ScriptedMetrics(make_task(corpus()), [0.1, 0.5, 0.6, 0.6, 0.605, 0.9, 0.9])
    result = train(tiny_model(), task, scripted_config(), run_dir=tmp_path, device=CPU)
    assert result.stopped_early and result.steps == 20
    assert result.best_step == 10 and result.best_metrics["accuracy"] == 0.6
    assert result.metrics["accuracy"] == 0.605  # the evaluation that stopped the run
    assert task.calls == 5  # no extra final evaluation after an early stop
    evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if "accuracy" in r]
    assert [r["step"] for r in evals] == [0, 5, 10, 15, 20]
    # resuming a run that stopped early trains no further
    again = train(tiny_model(), ScriptedMetrics(make_task(corpus()), [0.0]), scripted_config(),
                  run_dir=tmp_path, device=CPU, resume=True)
    assert again.steps == 20 and again.stopped_early and again.best_step == 10
    # a loss-like metric falls: the direction is inferred from the name
    task = ScriptedMetrics(make_task(corpus()), [0.1, 0.5, 0.6, 0.6, 0.605, 0.9, 0.9])
    result = train(tiny_model(), task, scripted_config(metric="accuracy", greater_is_better=False),
                   run_dir=tmp_path / "lower", device=CPU)
    assert result.best_step == 0 and result.stopped_early and result.steps == 10


def test_best_checkpoint_survives_pruning_and_restore_best_loads_it(tmp_path):
    tokens = corpus()
    task = ScriptedMetrics(make_task(tokens), [0.1, 0.5, 0.6, 0.55, 0.58, 0.59, 0.4])
    model = tiny_model()
    result = train(model, task, scripted_config(max_steps=30, patience=0,
                                                restore_best=True),
                   run_dir=tmp_path / "run", device=CPU)
    assert not result.stopped_early and result.steps == 30 and result.best_step == 10
    assert [c.step for c in list_checkpoints(tmp_path / "run")] == [30]  # keep_last=1
    best = best_checkpoint(tmp_path / "run")
    assert best is not None and best.step == 10
    # the weights after 10 steps of the same (deterministic) run
    reference = tiny_model()
    train(reference, make_task(tokens), loop_config(max_steps=30, eval_every=0, save_every=10,
                                                    keep_last=0),
          run_dir=tmp_path / "ref", device=CPU)
    at_10 = load_file(tmp_path / "ref" / "checkpoints" / "step-00000010" / "model.safetensors")
    stored = load_file(best.path / "model.safetensors")
    assert stored.keys() == at_10.keys()
    for name, value in at_10.items():
        assert torch.equal(stored[name], value), name
        assert torch.equal(model.state_dict()[name], value), name  # restore_best
    assert not torch.equal(reference.wte.weight, model.wte.weight)  # the final weights differ


def test_tracker_state_round_trips_and_missing_metric_is_a_config_error():
    tracker = BestTracker("val_loss", greater_is_better=False, patience=3, min_delta=0.1)
    for step, loss in enumerate([2.0, 1.5, 1.45, 1.6]):
        tracker.update(step, {"val_loss": loss})
    assert (tracker.best_step, tracker.evals_since_best) == (1, 2)
    restored = BestTracker("val_loss", greater_is_better=False, patience=3, min_delta=0.1)
    restored.load_state_dict(tracker.state_dict())
    assert restored == tracker
    assert tracker.update(9, {}) is None  # a task without validation data
    with pytest.raises(ConfigError, match="'accuracy' is not among"):
        BestTracker("accuracy", greater_is_better=True).update(0, {"val_loss": 1.0})


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="lr_schedule"):
        loop_config(lr_schedule="step")
    with pytest.raises(ConfigError, match="restore_best needs keep_best"):
        loop_config(restore_best=True, keep_best=False)
    with pytest.raises(ConfigError, match="needs eval_every"):
        loop_config(patience=2, eval_every=0)
    assert OptimConfig(lr=1e-3).higher_is_better is False  # val_loss
    assert OptimConfig(lr=1e-3, metric="f1").higher_is_better is True


def test_schedules():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    for schedule in ("cosine", "linear", "constant"):
        assert lr_at(4, schedule=schedule, **kw) == pytest.approx(1e-3 * 5 / 11)  # warmup
        assert lr_at(10, schedule=schedule, **kw) == pytest.approx(1e-3)
    assert lr_at(60, schedule="linear", **kw) == pytest.approx(5.5e-4)
    assert lr_at(110, schedule="linear", **kw) == pytest.approx(1e-4)
    assert lr_at(60, schedule="constant", **kw) == lr_at(500, schedule="constant", **kw) == 1e-3
