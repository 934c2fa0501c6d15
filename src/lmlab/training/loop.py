"""THE training loop. Objectives and fine-tuning tasks plug in as small Task objects.

A task provides, per optimizer step, this process's micro-batches, and computes a *summed* loss
and the number of targets per micro-batch. The loop divides by the target count of the whole
accumulated batch — so k micro-batches of b sequences give exactly the update of one batch of
k·b, which averaging per micro-batch does not (transformers PR #34191).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from lmlab.errors import LmlabError
from lmlab.training import checkpoint as ckpt_io
from lmlab.training.optim import build_optimizer
from lmlab.training.runtime import autocast
from lmlab.training.schedule import lr_at
from lmlab.training.tracking import MetricsLog

log = logging.getLogger(__name__)
CALIBRATION = (5, 25)  # a time-budgeted run times steps 5..25 to fix its number of steps


class Task(Protocol):
    def train_batches(self, step: int) -> list[dict[str, torch.Tensor]]: ...
    def num_targets(self, batch: dict[str, torch.Tensor]) -> int: ...
    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def evaluate(self, model, *, final: bool = False) -> dict[str, float]: ...


@dataclass
class LoopConfig:
    max_steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float
    eval_every: int
    save_every: int
    keep_last: int
    log_every: int
    max_minutes: float | None
    max_bad_steps: int
    tensorboard: bool
    progress: bool


class TrainingStopped(LmlabError):
    """Too many non-finite steps in a row; the last good state was checkpointed."""


@dataclass
class TrainResult:
    steps: int
    final_train_loss: float | None
    metrics: dict[str, float]  # the last evaluation
    first_metrics: dict[str, float] | None  # the evaluation before training (fresh runs only)
    train_seconds: float
    tokens_per_second: float


def train(
    model: torch.nn.Module,
    task: Task,
    cfg: LoopConfig,
    *,
    run_dir: Path,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    resume: bool = False,
    tokens_per_step: int = 0,
) -> TrainResult:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer = build_optimizer(
        model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    start_step, max_steps = 0, cfg.max_steps
    budget_fixed = cfg.max_minutes is None
    if resume:
        latest = ckpt_io.latest_valid(run_dir)
        if latest is None:
            log.warning("--resume: no valid checkpoint in %s; starting from step 0", run_dir)
        else:
            state = ckpt_io.load_checkpoint(latest, model)
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng_cpu"])
            if torch.cuda.is_available() and "rng_cuda" in state:
                torch.cuda.set_rng_state_all(state["rng_cuda"])
            start_step, budget_fixed = state["step"], True
            # A time-budgeted run keeps the horizon it fitted; otherwise the config decides, so
            # `--resume --max_steps N` can extend a finished run (the cosine tail is stretched).
            if cfg.max_minutes is not None:
                max_steps = state["max_steps"]
            elif cfg.max_steps != state["max_steps"]:
                log.info("max_steps changed from %d to %d: the schedule's horizon moves",
                         state["max_steps"], cfg.max_steps)
            log.info("resumed from %s (step %d of %d)", latest.path, start_step, max_steps)
    metrics_log = MetricsLog(
        run_dir, tensorboard=cfg.tensorboard, resume_step=start_step if resume else None
    )

    def evaluate(final: bool = False) -> dict[str, float]:
        model.eval()
        with autocast(device, amp_dtype):
            result = task.evaluate(model, final=final)
        model.train()
        return result

    def save(step: int) -> None:
        state = {
            "step": step,
            "max_steps": max_steps,
            "optimizer": optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        ckpt_io.save_checkpoint(run_dir, step, model, state, keep_last=cfg.keep_last)

    t_begin = time.perf_counter()  # the time budget counts evaluations too
    first_metrics = None
    last_metrics: dict[str, float] = {}
    eval_seconds = 0.0  # the cost of one evaluation, to reserve budget for the remaining ones
    if start_step == 0:
        first_metrics = last_metrics = evaluate()
        metrics_log.log(0, **first_metrics)
        eval_seconds = time.perf_counter() - t_begin

    model.train()
    bar = tqdm(total=max_steps, initial=start_step, disable=not cfg.progress, unit="step",
               dynamic_ncols=True)
    t_start = time.perf_counter()
    train_seconds, trained_steps, bad_in_a_row = 0.0, 0, 0
    t_calibrate = t_start
    train_loss: float | None = None
    step = start_step
    while step < max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                   max_steps=max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = task.train_batches(step)
        n_targets = sum(task.num_targets(b) for b in batches)
        loss_total = torch.zeros((), device=device)
        for batch in batches:
            with autocast(device, amp_dtype):
                loss = task.loss(model, batch) / n_targets
            loss.backward()
            loss_total += loss.detach()
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                     if cfg.grad_clip > 0 else None)
        finite = bool(torch.isfinite(loss_total)) and (
            grad_norm is None or bool(torch.isfinite(grad_norm)))
        if finite:
            optimizer.step()
            bad_in_a_row = 0
        else:
            bad_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient; update skipped", step)
        optimizer.zero_grad(set_to_none=True)
        if bad_in_a_row >= cfg.max_bad_steps:
            bar.close()
            metrics_log.close()
            raise TrainingStopped(
                f"{bad_in_a_row} non-finite steps in a row at step {step}; stopped. The last "
                f"checkpoint in {run_dir / 'checkpoints'} holds the last good state — lower lr "
                "or check the data"
            )
        step += 1
        trained_steps += 1
        train_seconds += time.perf_counter() - t0

        if step % cfg.log_every == 0 or step == max_steps:
            train_loss = float(loss_total)
            record: dict[str, Any] = {"train_loss": train_loss, "lr": lr}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if tokens_per_step:
                record["tokens_per_s"] = tokens_per_step * trained_steps / train_seconds
            metrics_log.log(step, **record)
            bar.set_postfix(loss=f"{train_loss:.4f}",
                            tok_s=f"{record.get('tokens_per_s', 0):,.0f}", refresh=False)
        bar.update(1)

        if trained_steps == CALIBRATION[0]:
            t_calibrate = time.perf_counter()
        if not budget_fixed and trained_steps == CALIBRATION[1]:
            # Fit the run into the time budget now that a step's cost is known (measured after
            # the first, slower steps) — leaving time for the evaluations still to come — and
            # let the cosine schedule decay over the steps that will really run.
            per_step = (time.perf_counter() - t_calibrate) / (CALIBRATION[1] - CALIBRATION[0])
            remaining = cfg.max_minutes * 60 - (time.perf_counter() - t_begin)
            fit = step + int(remaining / per_step)
            n_evals = 1 + ((fit - step) // cfg.eval_every if cfg.eval_every else 0)
            fit = step + int(0.97 * (remaining - n_evals * eval_seconds) / per_step)
            if fit < max_steps:
                max_steps = max(step + 1, fit)
                bar.total = max_steps
                log.info("time budget: training for %d steps", max_steps)
            budget_fixed = True

        if cfg.eval_every and step % cfg.eval_every == 0 and step != max_steps:
            last_metrics = evaluate()
            metrics_log.log(step, **last_metrics)
        if cfg.save_every and step % cfg.save_every == 0 and step != max_steps:
            save(step)
    bar.close()
    if step > start_step:
        last_metrics = evaluate(final=True)
        metrics_log.log(step, **last_metrics)
        save(step)
    elif not last_metrics:  # resumed a finished run: report, but log and save nothing new
        last_metrics = evaluate(final=True)
    metrics_log.close()
    return TrainResult(
        steps=step,
        final_train_loss=train_loss,
        metrics=last_metrics,
        first_metrics=first_metrics,
        train_seconds=train_seconds,
        tokens_per_second=(tokens_per_step * trained_steps / train_seconds
                           if train_seconds else math.nan),
    )
