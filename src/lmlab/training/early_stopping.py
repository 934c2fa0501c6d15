"""The best evaluation so far, and early stopping on it (patience counted in evaluations)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lmlab.errors import ConfigError


def default_greater_is_better(metric: str) -> bool:
    """Losses fall, everything else (accuracy, F1, BLEU …) rises — as transformers decides."""
    return "loss" not in metric


@dataclass
class BestTracker:
    metric: str
    greater_is_better: bool
    patience: int = 0  # evaluations without improvement before stopping; 0 = never stop
    min_delta: float = 0.0  # an improvement must beat the best by more than this
    best_value: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] | None = None
    evals_since_best: int = 0

    def update(self, step: int, metrics: dict[str, float]) -> bool | None:
        """Record an evaluation; True if it is the new best, None if it has no metrics at all
        (a task without validation data)."""
        if not metrics:
            return None
        if self.metric not in metrics:
            raise ConfigError(f"metric: {self.metric!r} is not among the evaluation's metrics "
                              f"{sorted(metrics)}; set metric to one of them")
        value = float(metrics[self.metric])
        if self.best_value is None:
            improved = math.isfinite(value)
        elif self.greater_is_better:
            improved = value > self.best_value + self.min_delta
        else:
            improved = value < self.best_value - self.min_delta
        if improved:
            self.best_value, self.best_step = value, step
            self.best_metrics = {k: float(v) for k, v in metrics.items()}
            self.evals_since_best = 0
        else:
            self.evals_since_best += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evals_since_best >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Only the running state: metric, direction, patience and min_delta come from the
        # (possibly edited) config of the resumed run.
        self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.best_metrics = state["best_metrics"]
        self.evals_since_best = state["evals_since_best"]
