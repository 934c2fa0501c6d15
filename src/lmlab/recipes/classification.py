"""Recipe `classification` (`lmlab finetune classification`): a pretrained BERT encoder or GPT
with a fresh sequence-classification head, trained on labelled texts (or text pairs).

RUN_DIR also holds `predictions_<split>.jsonl` (text, gold, predicted label, its probability)
and `confusion_<split>.png` for the test split, else validation.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmlab.errors import ConfigError, DataError
from lmlab.evaluation.classification import confusion_matrix, plot_confusion
from lmlab.models.bert import BertForSequenceClassification
from lmlab.models.gpt import GPTForSequenceClassification
from lmlab.models.hf import record_for
from lmlab.recipes import run_steps
from lmlab.recipes.finetuning import (adapt, FinetuneConfig, FinetuneResult, FinetunedRun, check_model,
                                      family_class, finish, pad_id, start, train_epochs)
from lmlab.recipes.registry import Recipe, register_recipe
from lmlab.tasks import classification as clf
from lmlab.tokenizer import Tokenizer

# Each family's classifier and how it starts from a pretrained checkpoint with a new head.
CLASSIFIERS = {
    BertForSequenceClassification: BertForSequenceClassification.from_encoder,
    GPTForSequenceClassification: GPTForSequenceClassification.from_backbone,
}


@dataclass
class FinetuneClassificationConfig(FinetuneConfig):
    text_field: str = "text"  # the field (CSV/TSV: column) holding the text
    text_pair_field: str | None = None  # a second text (sentence pairs; or title + body)
    label_field: str = "label"  # label names or integer ids
    format: Literal["auto", "jsonl", "csv", "tsv"] = "auto"  # auto: from the file suffix
    exclude_label: str | None = None  # e.g. CLINC150's "oos": also report in_scope_accuracy


def build_classifier(model_dir: Path, labels: list[str], tokenizer: Tokenizer):
    """The pretrained model of `model_dir` (a BERT encoder or a GPT) with a fresh
    classification head for `labels`."""
    cls = family_class(model_dir, CLASSIFIERS)
    if cls is None:
        families = " or ".join(sorted(record_for(c).model_type for c in CLASSIFIERS))
        raise ConfigError(f"model: {model_dir} is not a {families} model; classification "
                          "needs one")
    model = CLASSIFIERS[cls](model_dir, id2label=labels)
    if model.config.pad_token_id is None:  # the GPT head finds each row's last token by it
        model.config.pad_token_id = pad_id(tokenizer)
    return model


def uses_token_types(model) -> bool:
    """Whether the model embeds token types (BERT's segments A and B); a GPT has no such table."""
    return getattr(model.config, "type_vocab_size", 0) > 0


def read_examples(cfg: FinetuneClassificationConfig, path: str | Path, *,
                  require_label: bool = True) -> list[clf.Example]:
    """A data file's examples, read with the config's field names and format."""
    return clf.read_examples(Path(path), text_field=cfg.text_field,
                             text_pair_field=cfg.text_pair_field, label_field=cfg.label_field,
                             fmt=cfg.format, require_label=require_label)


def read_encoded(cfg: FinetuneClassificationConfig, path: str | Path, labels: list[str],
                 tokenizer: Tokenizer):
    """(examples, encoded) of a labelled data file."""
    examples = read_examples(cfg, path)
    return examples, clf.encode(tokenizer, examples, labels, max_length=cfg.max_length)


def exclude_id(cfg: FinetuneClassificationConfig, labels: list[str]) -> int | None:
    if cfg.exclude_label is None:
        return None
    if cfg.exclude_label not in labels:
        raise ConfigError(f"exclude_label {cfg.exclude_label!r} is not a label of the training "
                          f"data")
    return labels.index(cfg.exclude_label)


@run_steps.undo_on_failure
def finetune_classification(cfg: FinetuneClassificationConfig, *, run_dir: str | Path,
                            resume: bool = False, progress: bool = True) -> FinetuneResult:
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    dist, device, model_dir = start(cfg, run_dir, resume=resume)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    train_examples = read_examples(cfg, cfg.train)
    labels = clf.infer_labels(train_examples)
    if len(labels) < 2:
        raise DataError(f"{cfg.train}: a single label ({labels[0]!r}); classification needs "
                        "two or more")
    train_data = clf.encode(tokenizer, train_examples, labels, max_length=cfg.max_length)
    val = read_encoded(cfg, cfg.validation, labels, tokenizer)
    test = read_encoded(cfg, cfg.test, labels, tokenizer) if cfg.test else None
    model = dist.place(adapt(cfg, build_classifier(model_dir, labels, tokenizer)), device)
    check_model(cfg, model, tokenizer, model_dir)
    task = clf.ClassificationTask(
        train=train_data, val=val[1], plan=cfg.plan(train_data.lengths, dist),
        num_labels=len(labels),
        device=device, pad_id=pad_id(tokenizer), token_types=uses_token_types(model),
        eval_batch_size=cfg.eval_size, exclude_label=exclude_id(cfg, labels))
    result = train_epochs(cfg, model, task, recipe="classification", run_dir=run_dir,
                          device=device, dist=dist, resume=resume, progress=progress)
    if not dist.is_main:  # under torchrun rank 0 alone saves and reports
        return finish(run_dir, result, started=t0, test=None, predictions=None, write=False)
    run_steps.save_model(model, tokenizer, run_dir, max_length=cfg.max_length,
                         base=model_dir)
    split, (examples, data) = ("test", test) if test else ("validation", val)
    # Without a test split the report is on validation, which the final evaluation has just
    # scored — with the weights now in the model if the best step was the last one.
    known = task.last_val_probs if not test and result.best_step == result.steps else None
    model.eval()
    scores, predictions = _report(model, cfg, examples, data, labels, task, run_dir=run_dir,
                                  split=split, probs=known)
    return finish(run_dir, result, started=t0, test=scores if test else None,
                  predictions=predictions)


def _report(model, cfg, examples, data: clf.Encoded, labels: list[str], task, *, run_dir: Path,
            split: str, probs: np.ndarray | None = None) -> tuple[dict[str, float], Path]:
    """Metrics of `split`, its predictions file and confusion-matrix PNG."""
    if probs is None:
        probs = clf.predict_probabilities(model, data, batch_size=cfg.eval_size,
                                          pad_id=task.pad_id, token_types=task.token_types,
                                          device=task.device)
    predictions = run_steps.write_jsonl(run_dir / f"predictions_{split}.jsonl",
                                        _rows(examples, probs, labels))
    scores = clf.metrics_of(probs, data.labels, exclude=task.exclude_label)
    counts = confusion_matrix(data.labels, probs.argmax(1), len(labels))
    plot_confusion(counts, labels, run_dir / f"confusion_{split}.png",
                   title=f"{run_dir.name} {split}")
    return scores, predictions


def _rows(examples, probs: np.ndarray, labels: list[str]) -> list[dict[str, Any]]:
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


# -- a fine-tuned run: evaluate and predict ------------------------------------------------------
def _probabilities(run: FinetunedRun, encoded: clf.Encoded) -> np.ndarray:
    return clf.predict_probabilities(run.model, encoded, batch_size=run.cfg.eval_size,
                                     pad_id=pad_id(run.tokenizer),
                                     token_types=uses_token_types(run.model), device=run.device)


def evaluate_run(run: FinetunedRun, data: Path) -> dict[str, float]:
    labels = list(getattr(run.model.config, "id2label", None) or [])
    _, encoded = read_encoded(run.cfg, data, labels, run.tokenizer)
    return clf.metrics_of(_probabilities(run, encoded), encoded.labels,
                          exclude=exclude_id(run.cfg, labels))


def predict_run(run: FinetunedRun, data: Path, out: Path) -> Path:
    labels = list(getattr(run.model.config, "id2label", None) or [])
    examples = read_examples(run.cfg, data, require_label=False)
    # gold labels, where the file has them, are copied to the output, never checked
    unlabelled = [dataclasses.replace(e, label=None) for e in examples]
    encoded = clf.encode(run.tokenizer, unlabelled, labels, max_length=run.cfg.max_length)
    return run_steps.write_jsonl(out, _rows(examples, _probabilities(run, encoded), labels))


register_recipe(Recipe(
    name="classification", command="finetune", config=FinetuneClassificationConfig,
    run=finetune_classification, models=tuple(CLASSIFIERS), evaluate=evaluate_run,
    predict=predict_run,
    help="sequence classification (labels, or text pairs) on a BERT encoder or a GPT",
))
