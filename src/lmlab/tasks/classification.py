"""Sequence classification (sentiment, topic, intent): data, batches, loss and metrics.

Data is JSONL (one object per line) or CSV/TSV with a header row: a text field, optionally a
second text field (a sentence pair), and a label given as a name or an id. The label set is
inferred from the training file — sorted, numerically when every label is an integer — and saved
with the model as config.json's id2label, so that `lmlab predict` returns names.

The model is any module called as `model(input_ids, attention_mask=, token_type_ids=)` that
returns logits (B, num_labels): BERT's pooled [CLS] head or GPT's last-token head alike.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError, DataError
from lmlab.evaluation.classification import classification_metrics
from lmlab.tasks.batching import (NO_TARGETS, EpochPlan, length_sorted_batches, pad_rows,
                                  to_device, without_targets)
from lmlab.tokenizer import Tokenizer

FORMATS = ("auto", "jsonl", "csv", "tsv")


@dataclass
class Example:
    text: str
    pair: str | None
    label: str | None
    where: str  # "FILE line N", for errors


@dataclass
class Encoded:
    ids: list[np.ndarray]
    type_ids: list[np.ndarray]
    labels: np.ndarray | None  # label ids, or None for unlabelled data

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(r) for r in self.ids), dtype=np.int64, count=len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)


# -- reading -----------------------------------------------------------------------------------
def iter_records(path: Path, fmt: str = "auto") -> Iterator[tuple[int, dict]]:
    """(line number, record) pairs of a JSONL, CSV or TSV file; the format comes from `fmt`, or
    for "auto" from the suffix (.jsonl/.json, .csv, .tsv)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if fmt == "auto":
        fmt = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}.get(
            path.suffix.lower(), "")
        if not fmt:
            raise DataError(f"{path}: cannot tell the format from the suffix; expected .jsonl, "
                            ".csv or .tsv, or set format: jsonl|csv|tsv")
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            if fmt == "jsonl":
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path} line {number}: not valid JSON ({err.msg})") from None
                    if not isinstance(record, dict):
                        raise DataError(f"{path} line {number}: expected a JSON object")
                    yield number, record
            else:
                reader = csv.DictReader(handle, delimiter="," if fmt == "csv" else "\t")
                for record in reader:
                    yield reader.line_num, record
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None


def read_examples(path: Path, *, text_field: str, text_pair_field: str | None,
                  label_field: str | None, fmt: str = "auto",
                  require_label: bool = True) -> list[Example]:
    """Examples of one file; a missing field is a DataError naming the file and line. Without
    `require_label` (prediction) the label is read where present."""
    examples = []
    for number, record in iter_records(path, fmt):
        where = f"{path} line {number}"
        fields = [(text_field, True), (text_pair_field, True), (label_field, require_label)]
        values = []
        for name, required in fields:
            value = None if name is None else record.get(name)
            if name == label_field and value == "":  # an empty CSV cell
                value = None
            if value is None and name is not None and required:
                raise DataError(f"{where}: missing field '{name}' (fields: "
                                f"{', '.join(map(str, record))}); set "
                                f"{'label_field' if name == label_field else 'text_field'}")
            if value is not None and name != label_field and not isinstance(value, str):
                raise DataError(f"{where}: field '{name}' must be a string, got {value!r}")
            values.append(value)
        text, pair, label = values
        label = None if label is None else _label_name(label, where, label_field)
        examples.append(Example(text=text, pair=pair, label=label, where=where))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _label_name(value, where: str, field: str) -> str:
    """A label as its name: a string, or an integer id (JSON's 1.0 counts as 1)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: field '{field}' must be a label name or an integer id, "
                        f"got {value!r}")
    return str(value)


def infer_labels(examples: Sequence[Example]) -> list[str]:
    """The sorted label set (numerically when every label is an integer, so "10" follows "9")."""
    names = {e.label for e in examples}
    if all(_is_int(n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _is_int(name: str) -> bool:
    return name.lstrip("-").isdigit()


def label_ids(examples: Sequence[Example], labels: Sequence[str]) -> np.ndarray | None:
    """Each example's label id; None when no example has a label (unlabelled data)."""
    if all(e.label is None for e in examples):
        return None
    index = {name: i for i, name in enumerate(labels)}
    out = np.empty(len(examples), dtype=np.int64)
    for i, example in enumerate(examples):
        if example.label not in index:
            shown = ", ".join(labels[:10]) + (" …" if len(labels) > 10 else "")
            raise DataError(f"{example.where}: label {example.label!r} is not one of the "
                            f"{len(labels)} labels of the training data ({shown})")
        out[i] = index[example.label]
    return out


# -- encoding ----------------------------------------------------------------------------------
def encode(tokenizer: Tokenizer, examples: Sequence[Example], labels: Sequence[str], *,
           max_length: int) -> Encoded:
    """Token ids and types of every example (truncated to `max_length`, the longer text of a pair
    first; not padded — batches are padded dynamically) and their label ids."""
    has_pair = [e.pair is not None for e in examples]
    if any(has_pair) and not all(has_pair):
        first = examples[has_pair.index(False)]
        raise DataError(f"{first.where}: the text pair field is missing here but not elsewhere")
    encoded = tokenizer.encode_pairs([e.text for e in examples],
                                     [e.pair for e in examples] if all(has_pair) else None,
                                     max_length=max_length, padding="none")
    for example, row in zip(examples, encoded.rows):
        if not row.input_ids:
            raise DataError(f"{example.where}: the text encodes to no tokens")
    return Encoded(
        ids=[np.asarray(r.input_ids, dtype=np.int64) for r in encoded.rows],
        type_ids=[np.asarray(r.token_type_ids, dtype=np.int64) for r in encoded.rows],
        labels=label_ids(examples, labels),
    )


def collate(data: Encoded, rows: np.ndarray, *, pad_id: int, token_types: bool,
            device: torch.device) -> dict[str, torch.Tensor]:
    ids = pad_rows([data.ids[i] for i in rows], pad_id)
    batch = {"input_ids": ids,
             "attention_mask": pad_rows([np.ones(len(data.ids[i]), np.int64) for i in rows], 0)}
    if token_types:
        batch["token_type_ids"] = pad_rows([data.type_ids[i] for i in rows], 0)
    if data.labels is not None:
        batch["labels"] = torch.from_numpy(data.labels[rows])
    return {k: to_device(v, device) for k, v in batch.items()}


def logits_of(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["input_ids"], attention_mask=batch["attention_mask"],
                 token_type_ids=batch.get("token_type_ids")).float()


@torch.inference_mode()
def predict_probabilities(model, data: Encoded, *, batch_size: int, pad_id: int,
                          token_types: bool, device: torch.device) -> np.ndarray:
    """Class probabilities (N, num_labels) in the order of `data`."""
    out: np.ndarray | None = None
    for rows in length_sorted_batches(data.lengths, batch_size):
        batch = collate(data, rows, pad_id=pad_id, token_types=token_types, device=device)
        probs = torch.softmax(logits_of(model, batch), dim=-1).cpu().numpy()
        if out is None:
            out = np.empty((len(data), probs.shape[1]), dtype=np.float32)
        out[rows] = probs
    return out


def metrics_of(probs: np.ndarray, gold: np.ndarray, *, exclude: int | None = None,
               prefix: str = "") -> dict[str, float]:
    """loss (mean cross-entropy), accuracy, macro_f1 (+ in_scope_accuracy with `exclude`)."""
    picked = probs[np.arange(len(gold)), gold].astype(np.float64)
    result = {"loss": float(-np.log(np.maximum(picked, 1e-30)).mean())}
    result.update(classification_metrics(gold, probs.argmax(1), probs.shape[1], exclude=exclude))
    return {prefix + k: v for k, v in result.items()}


# -- the task ----------------------------------------------------------------------------------
class ClassificationTask:
    """Cross-entropy over labelled texts; evaluation = loss, accuracy and macro-F1 on the whole
    validation split (`val_accuracy` etc.). `plan` (None for evaluation only) says which training
    examples each step and rank takes."""

    def __init__(self, *, train: Encoded | None, val: Encoded | None, plan: EpochPlan | None,
                 num_labels: int, device: torch.device, pad_id: int, token_types: bool = True,
                 eval_batch_size: int = 64, exclude_label: int | None = None):
        if train is not None and train.labels is None:
            raise ConfigError("the training data has no labels")
        self.train, self.val, self.plan, self.num_labels = train, val, plan, num_labels
        self.device, self.pad_id, self.token_types = device, pad_id, token_types
        self.eval_batch_size, self.exclude_label = eval_batch_size, exclude_label
        self.last_val_probs: np.ndarray | None = None

    def train_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        def batch(rows):
            return collate(self.train, rows, pad_id=self.pad_id, token_types=self.token_types,
                           device=self.device)

        shares = self.plan.micro_batches(step)
        return ([batch(rows) for rows in shares] if shares
                else [without_targets(batch(self.plan.stand_in(step)), ["labels"])])

    def num_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return 0 if batch.get(NO_TARGETS) else batch["labels"].numel()

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy over the batch's examples (the loop normalises)."""
        return F.cross_entropy(logits_of(model, batch), batch["labels"], reduction="sum")

    def evaluate(self, model, *, final: bool = False) -> dict[str, float]:
        if self.val is None or self.val.labels is None:
            return {}
        probs = predict_probabilities(model, self.val, batch_size=self.eval_batch_size,
                                      pad_id=self.pad_id, token_types=self.token_types,
                                      device=self.device)
        self.last_val_probs = probs  # the final evaluation's, reused for its predictions file
        return metrics_of(probs, self.val.labels, exclude=self.exclude_label, prefix="val_")

