"""Learning-rate schedules: linear warmup, then cosine (GPT-2/3, nanoGPT), linear (BERT, the
transformers Trainer's default) or constant, down to a floor `min_lr`."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int,
          schedule: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based).

    A pure function of the step and the horizon, so a resumed run needs no scheduler state
    beyond `max_steps` (which the checkpoint holds)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return lr
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "linear":
        return lr - progress * (lr - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
