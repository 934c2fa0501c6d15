"""THE training loop. Objectives and fine-tuning tasks plug in as small Task objects.

A task provides, per optimizer step, this process's micro-batches, and computes a *summed* loss
and the number of targets per micro-batch. The loop divides by the target count of the whole
accumulated batch, across all processes — so k micro-batches of b sequences on each of N ranks
give exactly the update of one batch of k·b·N, which averaging per micro-batch does not
(transformers PR #34191). Nothing here assumes fixed shapes: micro-batches may differ in length
(dynamic padding) and in number of targets.

Everything that decides the future of a run — step, schedule horizon, optimizer, the RNG states
of every rank, the best metric and early-stopping count — is in each checkpoint; data are a pure
function of (seed, step). So a run killed at any moment resumes bit for bit. SIGINT (Ctrl-C) and
SIGTERM stop it at the next step boundary with a checkpoint of that step (training/interrupt.py).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
from tqdm.auto import tqdm

from lmlab.errors import CheckpointError, ConfigError, Interrupted, LmlabError
from lmlab.kernels.dropout import native_dropout
from lmlab.training import checkpoint as ckpt_io
from lmlab.training.distributed import Distributed, rng_state, set_rng_state
from lmlab.training.early_stopping import BestTracker, default_greater_is_better
from lmlab.training.interrupt import StopSignals
from lmlab.training.optim import build_optimizer, clip_grad_norm_
from lmlab.training.perf import matmul_peak_flops, peak_memory_mb, reset_peak_memory
from lmlab.training.runtime import autocast, setup_cuda
from lmlab.training.schedule import SCHEDULES, lr_at
from lmlab.training.tracking import MetricsLog

log = logging.getLogger(__name__)
CALIBRATION = (5, 25)  # a time-budgeted run times steps 5..25 to fix its number of steps


def steps_that_fit(step: int, remaining: float, *, per_step: float, eval_every: int,
                   eval_seconds: float) -> int:
    """The horizon (a step number) that `remaining` seconds reach from `step`, at `per_step`
    seconds a step and `eval_seconds` for each evaluation still to come (one every
    `eval_every` steps, and the final one), with 3% to spare."""
    steps = int(max(remaining, 0.0) / per_step)
    n_evals = 1 + (steps // eval_every if eval_every else 0)
    return step + int(0.97 * max(remaining - n_evals * eval_seconds, 0.0) / per_step)


class Task(Protocol):
    def train_batches(self, step: int) -> list[dict[str, torch.Tensor]]: ...
    def num_targets(self, batch: dict[str, torch.Tensor]) -> int: ...
    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def evaluate(self, model, *, final: bool = False) -> dict[str, float]: ...


@dataclass
class OptimConfig:
    """The loop's settings that every recipe shares: each recipe's config nests one as `optim`
    (with the recipe's own defaults), so a setting added here reaches every recipe. Its keys are
    written flat (`--lr 3e-4`) or dotted (`--optim.lr 3e-4`); see lmlab/config.py."""

    # Keys of earlier versions (pretraining's early stopping) and the names that replaced them.
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"early_stopping_patience": "patience",
                                              "early_stopping_min_delta": "min_delta"}
    # -- the optimizer and the learning-rate schedule
    # adamw; or adafactor (torch.optim.Adafactor: each step relative to the weight's RMS, the
    # optimizer T5 was trained with — its initialisation, unit-variance embeddings, assumes it)
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    lr: float = 1e-3  # peak learning rate, reached at the end of the warmup
    min_lr: float = 0.0  # the learning rate the schedule ends at
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after the linear warmup
    weight_decay: float = 0.0  # on matrices only
    beta1: float = 0.9  # AdamW's decay of the gradient's running mean
    beta2: float = 0.999  # AdamW's decay of the squared gradient's running mean
    adam_eps: float = 1e-8  # AdamW's epsilon: the floor under each element's RMS gradient
    grad_clip: float = 1.0  # 0 = no clipping (the norm is still computed, to catch NaN)
    # -- batches, which the recipe's task draws: per process; a step is batch_size × grad_accum
    # × processes
    batch_size: int = 32  # examples (sequences) per micro-batch, per process
    grad_accum: int = 1  # micro-batches accumulated into one optimizer step
    # -- the best model, early stopping, checkpoints
    metric: str = "val_loss"  # the key of Task.evaluate's dict that decides "best"
    greater_is_better: bool | None = None  # None: False if the metric's name contains "loss"
    patience: int = 0  # evaluations without improvement before stopping; 0 = off
    min_delta: float = 0.0  # improvements of at most this do not count
    keep_best: bool = True  # write RUN_DIR/checkpoints/best whenever the metric improves
    restore_best: bool = False  # end with the best weights in the model (load_best_model_at_end)
    keep_last: int = 2  # step checkpoints kept; 0 = all (the best one is never pruned)
    # -- guards, budget, logging
    max_bad_steps: int = 10  # non-finite steps in a row before the run stops
    max_minutes: float | None = None  # time budget: the number of steps is cut to what fits
    log_every: int = 10  # steps between logged training losses (metrics.jsonl)
    tensorboard: bool = False  # also log to RUN_DIR/tensorboard
    # -- runtime (the recipe seeds and picks the device and autocast dtype before the loop)
    seed: int = 1337  # seeds initialisation, data order, masking and dropout
    device: str = "auto"  # auto (CUDA if present, else CPU), cpu, cuda or cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPUs with native bf16
    compile: bool = False  # torch.compile the training forward
    cpu_kernels: bool = True  # the CPU speed layer where it applies (lmlab/kernels/__init__.py)

    def __post_init__(self):
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"lr_schedule: expected one of {list(SCHEDULES)}, "
                              f"got {self.lr_schedule!r}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, "
                              f"min_lr={self.min_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.adam_eps <= 0:
            raise ConfigError(f"need beta1 and beta2 in [0, 1) and adam_eps > 0, got "
                              f"{self.beta1}, {self.beta2}, {self.adam_eps}")
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.keep_last < 0:
            raise ConfigError(f"keep_last must be >= 0, got {self.keep_last}")
        if self.patience < 0 or self.min_delta < 0:
            raise ConfigError(f"patience and min_delta must be >= 0, got {self.patience} and "
                              f"{self.min_delta}")
        if self.restore_best and not self.keep_best:
            raise ConfigError("restore_best needs keep_best: the best weights are read back from "
                              "RUN_DIR/checkpoints/best")
        if self.max_bad_steps < 1:
            raise ConfigError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"max_minutes must be > 0, got {self.max_minutes}")

    @property
    def higher_is_better(self) -> bool:
        if self.greater_is_better is None:
            return default_greater_is_better(self.metric)
        return self.greater_is_better


@dataclass
class LoopConfig:
    """One run of the loop: the shared settings plus what a recipe derives from its horizon
    (pretraining: steps; fine-tuning: epochs)."""

    max_steps: int
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup_steps: int = 0
    eval_every: int = 0  # 0 = evaluate only before training and at the end
    save_every: int = 0  # 0 = checkpoint only at the end
    eval_at_start: bool = True  # evaluate before step 0 on fresh runs
    progress: bool = False  # a progress bar, and a line per evaluation, on the console
    steps_per_epoch: int = 0  # epoch-based runs (fine-tuning): the console counts epochs

    def __post_init__(self):
        if self.optim.patience and not self.eval_every:
            raise ConfigError("patience needs eval_every > 0 (patience counts evaluations)")


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
    best_step: int | None = None
    best_metrics: dict[str, float] | None = None
    stopped_early: bool = False
    peak_memory_mb: float | None = None
    mfu: float | None = None  # model FLOPs utilisation against the measured matmul peak


@dataclass
class _Clock:
    """Training time (evaluations and checkpoints excluded) and what it produced."""

    seconds: float = 0.0
    steps: int = 0
    targets: int = 0

    def rate(self, amount: float) -> float:
        return amount / self.seconds if self.seconds else math.nan


def train(
    model: torch.nn.Module,
    task: Task,
    cfg: LoopConfig,
    *,
    run_dir: Path,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    resume: bool | Literal["auto"] = False,
    tokens_per_step: int = 0,
    flops_per_step: float = 0.0,
    dist: Distributed | None = None,
) -> TrainResult:
    """Train `model` (a plain module; wrapped for DDP/FSDP and compiled here) on `task`.

    `tokens_per_step` (global, 0 if unknown) gives tokens/s; `flops_per_step` (global model
    FLOPs of one optimizer step, 0 if unknown) gives MFU. Only rank 0 logs and writes files.
    `resume`: True continues from the newest valid checkpoint (CheckpointError if there is none),
    "auto" continues if there is one and starts afresh otherwise. SIGINT or SIGTERM while training
    checkpoints the current step and raises `lmlab.errors.Interrupted`."""
    if resume not in (False, True, "auto"):
        raise ConfigError(f"resume: expected true, false or 'auto', got {resume!r}")
    return _Trainer(model, task, cfg, run_dir=Path(run_dir), device=device, amp_dtype=amp_dtype,
                    tokens_per_step=tokens_per_step, flops_per_step=flops_per_step,
                    dist=dist or Distributed()).run(resume=resume)


@dataclass
class _Trainer:
    model: torch.nn.Module
    task: Task
    cfg: LoopConfig
    run_dir: Path
    device: torch.device
    amp_dtype: torch.dtype | None
    tokens_per_step: int
    flops_per_step: float
    dist: Distributed
    clock: _Clock = field(default_factory=_Clock)

    def __post_init__(self):
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        setup_cuda(self.device)  # TF32 for fp32 matmuls; the device made current
        self.wrapped = self.dist.wrap(self.model, self.device, param_dtype=self.amp_dtype)
        self.optim = self.cfg.optim
        self.runnable = torch.compile(self.wrapped) if self.optim.compile else self.wrapped
        # One process on the CPU: the speed layer's FlatAdamW lays the parameters out in one
        # buffer, so the optimizer and the clipping treat them, and the C step's gradients, as
        # one tensor. DDP/FSDP manage their parameters' memory themselves.
        self.optimizer = build_optimizer(self.model, lr=self.optim.lr,
                                         weight_decay=self.optim.weight_decay,
                                         betas=(self.optim.beta1, self.optim.beta2),
                                         eps=self.optim.adam_eps, distributed=self.dist.active,
                                         speed_layer=self.optim.cpu_kernels,
                                         name=self.optim.optimizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # A model with a frozen base (LoRA) checkpoints its trainable weights only: the base is
        # the pretrained model the recipe loads again on --resume.
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        self.saved_names = (trainable if len(trainable) < len(list(self.model.parameters()))
                            else None)
        self.tracker = BestTracker(self.optim.metric, self.optim.higher_is_better,
                                   patience=self.optim.patience, min_delta=self.optim.min_delta)
        self.step, self.max_steps = 0, self.cfg.max_steps
        self.saved_step, self.saved_path = -1, None  # the last checkpoint written
        self.losses_since_eval: list[torch.Tensor] = []  # for the console's line per evaluation
        self.stop = StopSignals(self.dist, self.device)  # SIGINT/SIGTERM while training
        self.budget_fixed = self.optim.max_minutes is None
        self.metrics_log: MetricsLog | None = None

    # -- state -----------------------------------------------------------------------------------
    def restore(self, *, strict: bool) -> bool:
        """Load the newest valid checkpoint (rank 0 reads, every rank receives); if there is none,
        raise (`strict`) or return False."""
        latest = ckpt_io.latest_valid(self.run_dir) if self.dist.is_main else None
        path = self.dist.broadcast(str(latest.path) if latest else None)
        if path is None:
            if strict:
                raise CheckpointError(f"--resume: no valid checkpoint in {self.run_dir} to "
                                      "continue from (--resume auto would start a new run)")
            log.info("--resume auto: no checkpoint in %s; starting a new run", self.run_dir)
            return False
        weights, state = ckpt_io.read_checkpoint(latest) if self.dist.is_main else ({}, {})
        if self.dist.is_main:
            ckpt_io.check_weights(latest, weights, self.model, self.saved_names)
            if "tracker" not in state:
                raise CheckpointError(f"{latest.path}: written by an older lmlab (no RNG or "
                                      "early-stopping state); start a new run")
        self.dist.load_full_state(self.model, self.optimizer, weights, state.get("optimizer"))
        state = self.dist.broadcast({k: v for k, v in state.items() if k != "optimizer"})
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:  # another number of processes: the data are the same, dropout masks cannot be
            log.warning("resuming %d processes from a checkpoint of %d: RNG states are reseeded",
                        self.dist.world_size, len(rngs))
            torch.manual_seed(state["step"] * 1000 + self.dist.rank)
        self.tracker.load_state_dict(state["tracker"])
        self.step, self.budget_fixed = state["step"], True
        # A time-budgeted run keeps the horizon it fitted; otherwise the config decides, so
        # `--resume --max_steps N` can extend a finished run (the schedule's tail is stretched).
        if self.optim.max_minutes is not None:
            self.max_steps = state["max_steps"]
        elif self.cfg.max_steps != state["max_steps"]:
            log.info("max_steps changed from %d to %d: the schedule's horizon moves",
                     state["max_steps"], self.cfg.max_steps)
        log.info("resumed from %s (step %d of %d)", path, self.step, self.max_steps)
        return True

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds: all of them, or the trainable ones of a model with a
        frozen base (collective under FSDP)."""
        weights = self.dist.full_weights(self.model)
        if self.saved_names is None:
            return weights
        return {name: w for name, w in weights.items() if name in self.saved_names}

    def save(self) -> None:
        """A checkpoint of the current state (collective: every rank contributes its part)."""
        weights = self.weights()
        optimizer = self.dist.full_optimizer_state(self.model, self.optimizer)
        rngs = self.dist.gather(rng_state())
        if self.dist.is_main:
            state = {"step": self.step, "max_steps": self.max_steps, "optimizer": optimizer,
                     "rng": rngs, "tracker": self.tracker.state_dict(),
                     "world_size": self.dist.world_size}
            self.saved_path = ckpt_io.save_checkpoint(self.run_dir, self.step, weights, state,
                                                      keep_last=self.optim.keep_last)
        self.dist.barrier()
        self.saved_step = self.step

    # -- evaluation ------------------------------------------------------------------------------
    def measure(self, *, final: bool = False) -> dict[str, float]:
        """Rank 0's figures on every rank, so that decisions taken on them (best, early
        stopping) agree everywhere. Under DDP rank 0 alone evaluates — on the whole validation
        data, with the weights every rank holds: one process's figures — while the others wait
        for them; an FSDP forward needs every rank's shards, so there all ranks evaluate."""
        metrics: dict[str, float] = {}
        if self.dist.is_main or self.dist.parallel == "fsdp":
            self.model.eval()
            with autocast(self.device, self.amp_dtype):
                metrics = self.task.evaluate(self.model, final=final)
            self.model.train()
        return self.dist.broadcast({k: float(v) for k, v in metrics.items()})

    def evaluate(self, *, final: bool = False) -> dict[str, float]:
        """Measure, log, report, and keep the weights if they are the best so far."""
        metrics = self.measure(final=final)
        self.log(self.step, **metrics)
        best = self.tracker.update(self.step, metrics)
        if best and self.optim.keep_best:
            weights = self.weights()
            if self.dist.is_main:
                ckpt_io.save_best(self.run_dir, self.step, weights, metrics)
            self.dist.barrier()
        self.report(metrics, best=best)
        return metrics

    def report(self, metrics: dict[str, float], *, best: bool) -> None:
        """The console's line per evaluation after training steps (the one before training is
        the command's to report): where the run is, the mean training loss since the last
        evaluation, the figures, and whether they are the best so far. tqdm.write puts it
        above the progress bar instead of through it; without a bar it is a log line."""
        losses, self.losses_since_eval = self.losses_since_eval, []
        if not (self.dist.is_main and self.step > 0):
            return
        per_epoch = self.cfg.steps_per_epoch
        where = (f"epoch {self.step / per_epoch:.3g}/{self.max_steps / per_epoch:.3g}"
                 if per_epoch else f"step {self.step}/{self.max_steps}")
        parts = [f"train loss {float(torch.stack(losses).mean()):.4f}"] if losses else []
        parts += [f"{name} {value:.4g}" for name, value in metrics.items()]
        line = f"{where}: {', '.join(parts)}{' (best)' if best else ''}"
        if self.cfg.progress:
            tqdm.write(line)
        else:
            log.info("%s", line)

    def restore_best(self) -> None:
        best = ckpt_io.best_checkpoint(self.run_dir) if self.dist.is_main else None
        found = self.dist.broadcast(best is not None)
        if not found:
            log.warning("restore_best: no best checkpoint (no evaluation produced %r); keeping "
                        "the final weights", self.optim.metric)
            return
        weights = ckpt_io.read_checkpoint(best)[0] if self.dist.is_main else {}
        if self.dist.is_main:
            ckpt_io.check_weights(best, weights, self.model, self.saved_names)
        self.dist.load_full_state(self.model, None, weights, None)
        log.info("restored the best weights (step %s)", self.tracker.best_step)

    def log(self, step: int, **values: Any) -> None:
        if self.metrics_log is not None:
            self.metrics_log.log(step, **values)

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Forward and backward over this rank's micro-batches, then (if finite) the update.
        Returns the global mean loss, the gradient norm and the learning rate."""
        lr = lr_at(self.step, lr=self.optim.lr, min_lr=self.optim.min_lr,
                   warmup_steps=self.cfg.warmup_steps, max_steps=self.max_steps,
                   schedule=self.optim.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self.task.train_batches(self.step)
        if not batches:
            raise ConfigError(f"task returned no micro-batches for step {self.step}")
        n_targets = float(sum(self.task.num_targets(b) for b in batches))
        if self.dist.active:  # one small all-reduce (and sync) per step, only with processes
            count = torch.tensor(n_targets, dtype=torch.float64, device=self.device)
            n_targets = float(self.dist.all_reduce_sum(count))
        self.clock.targets += int(n_targets)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        for i, batch in enumerate(batches):
            with self.dist.sync_gradients(self.wrapped, i == len(batches) - 1):
                with autocast(self.device, self.amp_dtype):
                    summed = self.task.loss(self.runnable, batch)
                loss = summed / n_targets
                if self.dist.world_size > 1:  # DDP and FSDP average gradients over ranks
                    loss = loss * self.dist.world_size
                loss.backward()
            loss_sum += summed.detach()
        mean_loss = self.dist.all_reduce_sum(loss_sum) / n_targets
        max_norm = self.optim.grad_clip if self.optim.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm_(self.params, max_norm, self.optimizer)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor; the norm of the whole gradient
            grad_norm = grad_norm.full_tensor()
        # The step's one wait for the GPU (besides logging): both checks in a single sync.
        if bool(torch.isfinite(mean_loss) & torch.isfinite(grad_norm).to(mean_loss.device)):
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:
            self.bad_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient; update skipped", self.step)
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, grad_norm, lr

    def log_step(self, loss: float, grad_norm: float, lr: float) -> dict[str, Any]:
        record: dict[str, Any] = {"train_loss": loss, "lr": lr, "grad_norm": grad_norm}
        if self.tokens_per_step:
            record["tokens_per_s"] = self.clock.rate(self.tokens_per_step * self.clock.steps)
        else:
            record["targets_per_s"] = self.clock.rate(self.clock.targets)
        if (mfu := self.mfu()) is not None:
            record["mfu"] = mfu
        record["peak_mem_mb"] = peak_memory_mb(self.device)
        self.log(self.step, **record)
        return record

    def fit_time_budget(self, t_begin: float, t_calibrate: float, eval_seconds: float) -> None:
        """Fit the run into the time budget now that a step's cost is known (measured after the
        first, slower steps) — leaving time for the evaluations still to come — so the schedule
        decays over the steps that will really run. Rank 0 decides for all."""
        per_step = (time.perf_counter() - t_calibrate) / (CALIBRATION[1] - CALIBRATION[0])
        fit = self.budget_horizon(t_begin, per_step, eval_seconds)
        if fit < self.max_steps:
            self.max_steps = max(self.step + 1, fit)
            log.info("time budget: training for %d steps", self.max_steps)
        self.budget_fixed = True

    def budget_horizon(self, t_begin: float, per_step: float, eval_seconds: float) -> int:
        """The step the rest of the budget reaches at these costs (rank 0's, for all ranks)."""
        remaining = self.optim.max_minutes * 60 - (time.perf_counter() - t_begin)
        return self.dist.broadcast(steps_that_fit(self.step, remaining, per_step=per_step,
                                                  eval_every=self.cfg.eval_every,
                                                  eval_seconds=eval_seconds))

    def refit_time_budget(self, t_begin: float, eval_seconds: float,
                          since: tuple[float, int]) -> None:
        """Fit the budget again after an evaluation, from the steps since the last one (`since`:
        the step clock's seconds and steps then) and the mean cost of an evaluation: twenty
        steps of calibration misjudge a run whose batches vary in length or whose machine is
        shared (a run fitted to 7,255 steps in 60 minutes was on course for 72). Never beyond
        the configured horizon; the schedule follows the new horizon from here (a linear or
        cosine decay bends by as much as the horizon moved)."""
        seconds, steps = self.clock.seconds - since[0], self.clock.steps - since[1]
        if steps <= 0:
            return
        per_step = seconds / steps
        fit = min(self.cfg.max_steps,
                  max(self.step + 1, self.budget_horizon(t_begin, per_step, eval_seconds)))
        if fit != self.max_steps:
            log.info("time budget: training for %d steps (was %d; %.2f s a step, %.1f s an "
                     "evaluation so far)", fit, self.max_steps, per_step, eval_seconds)
            self.max_steps = fit

    # -- the run ---------------------------------------------------------------------------------
    def run(self, *, resume: bool | Literal["auto"]) -> TrainResult:
        resumed = self.restore(strict=resume is True) if resume else False
        start_step = self.step
        if self.dist.is_main:
            self.metrics_log = MetricsLog(self.run_dir, tensorboard=self.optim.tensorboard,
                                          resume_step=start_step if resumed else None)
        self.peak_flops = (matmul_peak_flops(str(self.device), self.amp_dtype or torch.float32)
                           if self.flops_per_step else 0.0)
        reset_peak_memory(self.device)  # the probe's 8192² matrices are not the run's memory
        # The speed layer's dropout (T5's Dropout modules, for the run only): CPU masks drawn in
        # C, a T5 step ~1.15x faster. Not under torch.compile, whose graph it would break; on
        # accelerators F.dropout is one fused kernel already.
        try:
            with native_dropout(self.model, enabled=self.optim.cpu_kernels
                                and not self.optim.compile and self.device.type == "cpu"):
                return self._run(start_step)
        finally:
            self.stop.restore()
            if self.metrics_log is not None:
                self.metrics_log.close()

    def _run(self, start_step: int) -> TrainResult:
        cfg, optim = self.cfg, self.optim
        t_begin = time.perf_counter()  # the time budget counts evaluations too
        first_metrics, last_metrics, eval_seconds = None, {}, 0.0
        if start_step == 0 and cfg.eval_at_start:
            first_metrics = last_metrics = self.evaluate()
            eval_seconds = time.perf_counter() - t_begin
        self.model.train()
        # A time-budgeted run does not know its step count until it has timed a few steps: its
        # bar shows steps and rate without a total (no made-up ETA) until the budget is fitted.
        bar = tqdm(total=self.max_steps if self.budget_fixed else None, initial=start_step,
                   unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.dist.is_main))
        if not self.budget_fixed:
            bar.set_postfix_str(f"timing steps to fit the {optim.max_minutes * 60:.0f} s budget")
        self.bad_in_a_row, train_loss = 0, None
        stopped_early = self.tracker.should_stop  # resuming a run that had stopped early
        t_calibrate = time.perf_counter()
        # A budgeted run fits its horizon again after each evaluation — not after a resume,
        # whose clock started over (it keeps the horizon it was fitted to).
        refit, evals = not self.budget_fixed, [eval_seconds] if first_metrics else []
        since = (self.clock.seconds, self.clock.steps)  # the step clock at the last fit
        self.stop.install()
        while self.step < self.max_steps and not stopped_early:
            t0 = time.perf_counter()
            loss, grad_norm, lr = self.train_step()
            if self.bad_in_a_row >= optim.max_bad_steps:
                bar.close()
                self.stop_non_finite()
            self.step += 1
            self.clock.steps += 1
            self.clock.seconds += time.perf_counter() - t0
            self.losses_since_eval.append(loss)
            if self.step % optim.log_every == 0 or self.step == self.max_steps:
                train_loss = float(loss)
                record = self.log_step(train_loss, float(grad_norm), lr)
                bar.set_postfix(loss=f"{train_loss:.4f}", refresh=False,
                                tok_s=f"{record.get('tokens_per_s', 0):,.0f}")
            bar.update(1)
            if self.clock.steps == CALIBRATION[0]:
                t_calibrate = time.perf_counter()
            if not self.budget_fixed and self.clock.steps == CALIBRATION[1]:
                self.fit_time_budget(t_begin, t_calibrate, eval_seconds)
                bar.total = self.max_steps
                bar.refresh()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step != self.max_steps:
                t_eval = time.perf_counter()
                last_metrics = self.evaluate()
                evals.append(time.perf_counter() - t_eval)
                if refit and self.budget_fixed:
                    self.refit_time_budget(t_begin, sum(evals) / len(evals), since)
                    since = (self.clock.seconds, self.clock.steps)
                    bar.total = self.max_steps
                if self.tracker.should_stop:
                    stopped_early = True
                    log.info("early stopping at step %d: %s has not improved for %d evaluations "
                             "(best %s at step %s)", self.step, optim.metric,
                             self.tracker.evals_since_best, self.tracker.best_value,
                             self.tracker.best_step)
                    break
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step != self.max_steps:
                self.save()
            if self.step < self.max_steps and self.stop.requested():
                break
        bar.close()  # before anything is reported: nothing is appended to the bar
        interrupted = self.stop.requested()  # also a signal during the last step
        self.stop.restore()
        if interrupted and self.step < self.max_steps and not stopped_early:
            self.stop_interrupted()
        if self.step > start_step:
            if not stopped_early:  # an early stop has just evaluated
                last_metrics = self.evaluate(final=True)
            self.save()
        elif not last_metrics:  # resumed a finished run: report, but log and save nothing new
            last_metrics = self.measure(final=True)
        if interrupted:  # during the last step: the run's end is checkpointed, stop before more
            self.stop_interrupted()
        if optim.restore_best:
            self.restore_best()
        return TrainResult(
            steps=self.step, final_train_loss=train_loss, metrics=last_metrics,
            first_metrics=first_metrics, train_seconds=self.clock.seconds,
            tokens_per_second=self.clock.rate(self.tokens_per_step * self.clock.steps),
            best_step=self.tracker.best_step, best_metrics=self.tracker.best_metrics,
            stopped_early=stopped_early, peak_memory_mb=peak_memory_mb(self.device),
            mfu=self.mfu())

    def stop_non_finite(self) -> None:
        """Too many non-finite steps in a row: checkpoint and stop. The skipped updates left
        weights and optimizer at the last good state; the checkpoint resumes after the bad
        batches."""
        self.step += 1
        self.save()
        raise TrainingStopped(
            f"{self.bad_in_a_row} non-finite steps in a row at step {self.step - 1}; stopped. "
            f"{self.run_dir / 'checkpoints'} holds the last good state (step {self.step}) — "
            "lower lr or check the data, then --resume")

    def stop_interrupted(self) -> None:
        """SIGINT or SIGTERM asked to stop: checkpoint this step (unless that is done) and stop."""
        if self.saved_step != self.step:
            self.save()
        where = self.saved_path or self.run_dir / "checkpoints"
        raise Interrupted(f"interrupted at step {self.step}; checkpoint saved to {where}",
                          signum=self.stop.agreed, step=self.step, checkpoint=str(where))

    def mfu(self) -> float | None:
        if not (self.flops_per_step and self.peak_flops and self.clock.seconds):
            return None
        achieved = self.clock.rate(self.flops_per_step * self.clock.steps)
        return achieved / (self.peak_flops * self.dist.world_size)
