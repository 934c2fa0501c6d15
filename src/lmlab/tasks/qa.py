"""Extractive question answering (SQuAD v1.1): windows, span labels, loss and n-best decoding.

Each question is encoded as `[CLS] question [SEP] context [SEP]`; a context too long for
`max_length` is cut into windows that overlap by `stride` tokens (only the context is truncated),
so every answer shorter than the overlap lies whole inside at least one window. A training window
is labelled with the first and last token of the answer when the whole answer lies inside it, else
with [CLS] (index 0), as in BERT's SQuAD recipe. At evaluation the best span over all windows of a
question is chosen from the `n_best` start and end logits of each, at most `max_answer_length`
tokens long, and mapped back to the characters of the context through the token offsets.

For open-domain reading (recipes/open_qa.py) a span's score must compare across passages, which a
reader that has only seen answerable contexts cannot give: `with_negatives` adds, per training
question, other contexts of the set that BM25 ranks high for it but that hold none of its answers,
labelled with [CLS]. A reader trained so scores a span relative to its window's no-answer score,
start + end logit − the [CLS] start + end logit (`best_spans(relative=True)`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.errors import DataError
from lmlab.evaluation.squad import normalize_answer, squad_scores
from lmlab.tasks.batching import (NO_TARGETS, EpochPlan, length_sorted_batches, pad_rows,
                                  to_device, without_targets)
from lmlab.tokenizer import Tokenizer


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[str]  # gold answer texts (the first one is the training label)
    answer_starts: list[int]  # their character offsets in the context


@dataclass
class Windows:
    """One row per window; `example[i]` is the index of window i's question."""

    ids: list[np.ndarray]
    type_ids: list[np.ndarray]
    offsets: list[np.ndarray]  # (T, 2) character span in the context; (-1, -1) outside it
    example: np.ndarray
    starts: np.ndarray  # label token indices (0 = [CLS]: the answer is not in this window)
    ends: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(r) for r in self.ids), dtype=np.int64, count=len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)


# -- reading -----------------------------------------------------------------------------------
def read_squad(path: Path, *, titles: Sequence[str] | None = None) -> list[QAExample]:
    """The questions of a SQuAD v1.1-format JSON file, optionally only those of the articles
    named in `titles` (e.g. one article-disjoint half of a set)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: expected SQuAD format, {{\"data\": [{{\"title\", "
                        "\"paragraphs\": [{\"context\", \"qas\": [...]}]}]}}")
    articles = data["data"]
    if titles is not None:
        known = {a.get("title") for a in articles if isinstance(a, dict)}
        unknown = [t for t in titles if t not in known]
        if unknown:
            raise DataError(f"{path}: no article titled {unknown[0]!r}")
        wanted = set(titles)
        articles = [a for a in articles if a.get("title") in wanted]
    examples = []
    for a, article in enumerate(articles):
        for p, paragraph in enumerate(_field(article, "paragraphs", list, f"{path}: data[{a}]")):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = _field(paragraph, "context", str, where)
            for q, qa in enumerate(_field(paragraph, "qas", list, where)):
                examples.append(_example(qa, context, f"{where}.qas[{q}]"))
    if not examples:
        raise DataError(f"{path}: no questions")
    return examples


def _field(obj, name: str, kind: type, where: str):
    value = obj.get(name) if isinstance(obj, dict) else None
    if not isinstance(value, kind):
        raise DataError(f"{where}: missing or malformed field '{name}' (expected {kind.__name__})")
    return value


def _example(qa, context: str, where: str) -> QAExample:
    answers, starts = [], []
    for i, answer in enumerate(qa.get("answers") or [] if isinstance(qa, dict) else []):
        text = _field(answer, "text", str, f"{where}.answers[{i}]")
        start = _field(answer, "answer_start", int, f"{where}.answers[{i}]")
        if context[start:start + len(text)] != text:
            raise DataError(f"{where}.answers[{i}]: answer_start {start} does not point at "
                            f"{text!r} in the context")
        answers.append(text)
        starts.append(start)
    return QAExample(id=str(_field(qa, "id", str, where)), question=_field(qa, "question", str, where),
                     context=context, answers=answers, answer_starts=starts)


def with_negatives(examples: Sequence[QAExample], per_question: int) -> list[QAExample]:
    """`examples` followed by `per_question` unanswerable examples for each: the same question
    on the other contexts of the set that BM25 ranks highest for it, skipping any context that
    holds one of its gold answers (as text, after SQuAD's normalisation) — a passage that does
    answer it is not a negative. Deterministic: ties keep the contexts' order."""
    from lmlab.evaluation.retrieval import Passage, bm25_scores, build_bm25

    if per_question <= 0:
        return list(examples)
    contexts = list(dict.fromkeys(e.context for e in examples))
    normalised = [normalize_answer(c) for c in contexts]
    bm25 = build_bm25([Passage(title="", text=c) for c in contexts])
    negatives = []
    for e in examples:
        golds = [g for g in (normalize_answer(a) for a in e.answers) if g]
        ranked = np.argsort(-bm25_scores(bm25, e.question), kind="stable")
        chosen = itertools.islice((c for c in ranked if contexts[c] != e.context
                                   and not any(g in normalised[c] for g in golds)), per_question)
        negatives += [QAExample(id=f"{e.id}/negative{k}", question=e.question,
                                context=contexts[c], answers=[], answer_starts=[])
                      for k, c in enumerate(chosen)]
    return [*examples, *negatives]


# -- windows and labels ------------------------------------------------------------------------
def make_windows(tokenizer: Tokenizer, examples: Sequence[QAExample], *, max_length: int,
                 stride: int) -> Windows:
    encoded = tokenizer.encode_pairs(
        [e.question.lstrip() for e in examples], [e.context for e in examples],
        max_length=max_length, truncation="only_second", stride=stride,
        return_overflowing=True, padding="none")
    ids, type_ids, offsets, starts, ends = [], [], [], [], []
    for row, index in zip(encoded.rows, encoded.sample_index):
        span = np.asarray(row.offsets, dtype=np.int64).reshape(-1, 2)
        in_context = np.asarray([s == 1 for s in row.sequence_ids])
        span[~in_context] = -1
        start, end = span_label(span, examples[index])
        ids.append(np.asarray(row.input_ids, dtype=np.int64))
        type_ids.append(np.asarray(row.token_type_ids, dtype=np.int64))
        offsets.append(span)
        starts.append(start)
        ends.append(end)
    return Windows(ids=ids, type_ids=type_ids, offsets=offsets,
                   example=np.asarray(encoded.sample_index, dtype=np.int64),
                   starts=np.asarray(starts, dtype=np.int64), ends=np.asarray(ends, dtype=np.int64))


def span_label(offsets: np.ndarray, example: QAExample) -> tuple[int, int]:
    """(first, last) token of the first gold answer, or (0, 0) when the window does not hold all
    of it (or the question has no answer)."""
    if not example.answers:
        return 0, 0
    start_char = example.answer_starts[0]
    end_char = start_char + len(example.answers[0])
    context = np.flatnonzero(offsets[:, 0] >= 0)
    if context.size == 0 or offsets[context[0], 0] > start_char or offsets[context[-1], 1] < end_char:
        return 0, 0
    # the last token starting at or before the answer, the first ending at or after its end
    first = context[offsets[context, 0] <= start_char][-1]
    last = context[offsets[context, 1] >= end_char][0]
    return int(first), int(last)


def collate(windows: Windows, rows: np.ndarray, *, pad_id: int,
            device: torch.device) -> dict[str, torch.Tensor]:
    batch = {
        "input_ids": pad_rows([windows.ids[i] for i in rows], pad_id),
        "attention_mask": pad_rows([np.ones(len(windows.ids[i]), np.int64) for i in rows], 0),
        "token_type_ids": pad_rows([windows.type_ids[i] for i in rows], 0),
        "start_positions": torch.from_numpy(windows.starts[rows]),
        "end_positions": torch.from_numpy(windows.ends[rows]),
    }
    return {k: to_device(v, device) for k, v in batch.items()}


def span_logits_of(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) logits (B, T), padding positions at -inf-like so they never win or weigh."""
    start, end = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"])
    pad = batch["attention_mask"] == 0
    low = torch.finfo(torch.float32).min
    return start.float().masked_fill(pad, low), end.float().masked_fill(pad, low)


def summed_span_loss(start: torch.Tensor, end: torch.Tensor,
                     batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over windows of (CE(start) + CE(end)) / 2 — transformers' QA loss, summed."""
    return 0.5 * (F.cross_entropy(start, batch["start_positions"], reduction="sum")
                  + F.cross_entropy(end, batch["end_positions"], reduction="sum"))


# -- decoding ----------------------------------------------------------------------------------
@torch.inference_mode()
def window_logits(model, windows: Windows, *, batch_size: int, pad_id: int,
                  device: torch.device) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Start and end logits of every window (each of that window's length), and the mean loss."""
    starts: list[np.ndarray] = [np.empty(0)] * len(windows)
    ends: list[np.ndarray] = [np.empty(0)] * len(windows)
    loss = 0.0
    for rows in length_sorted_batches(windows.lengths, batch_size):
        batch = collate(windows, rows, pad_id=pad_id, device=device)
        start, end = span_logits_of(model, batch)
        loss += float(summed_span_loss(start, end, batch))
        start, end = start.cpu().numpy(), end.cpu().numpy()
        for k, i in enumerate(rows):
            n = len(windows.ids[i])
            starts[i], ends[i] = start[k, :n], end[k, :n]
    return starts, ends, loss / max(len(windows), 1)


def best_spans(examples: Sequence[QAExample], windows: Windows, starts: Sequence[np.ndarray],
               ends: Sequence[np.ndarray], *, n_best: int = 20, max_answer_length: int = 30,
               relative: float = 0.0) -> list[tuple[str, float]]:
    """For every example, the (answer text, score) of the best span over all its windows: among
    the `n_best` highest start and end logits of each window, pairs of context tokens with
    start ≤ end < start + max_answer_length, scored by start + end logit — minus `relative` ×
    the window's [CLS] start + end logit (its no-answer score): True (1) scores a span relative
    to it, other weights are for tuning. ("", -inf) when no window has such a pair."""
    best: list[tuple[str, float]] = [("", float("-inf"))] * len(examples)
    for w in range(len(windows)):
        offsets = windows.offsets[w]
        context = offsets[:, 0] >= 0
        s_logits = np.where(context, starts[w], -np.inf)
        e_logits = np.where(context, ends[w], -np.inf)
        top_s = np.argsort(-s_logits, kind="stable")[:n_best]
        top_e = np.argsort(-e_logits, kind="stable")[:n_best]
        top_s, top_e = top_s[context[top_s]], top_e[context[top_e]]
        length = top_e[None, :] - top_s[:, None] + 1  # (n_best starts, n_best ends)
        scores = np.where((length >= 1) & (length <= max_answer_length),
                          s_logits[top_s][:, None] + e_logits[top_e][None, :], -np.inf)
        if relative:
            scores = scores - relative * (starts[w][0] + ends[w][0])
        if scores.size == 0 or not np.isfinite(scores.max()):
            continue
        i, j = np.unravel_index(np.argmax(scores), scores.shape)
        index = windows.example[w]
        if scores[i, j] > best[index][1]:
            text = examples[index].context[offsets[top_s[i], 0]:offsets[top_e[j], 1]]
            best[index] = (text, float(scores[i, j]))
    return best


# -- the task ----------------------------------------------------------------------------------
class QATask:
    """Span-extraction loss over training windows; evaluation = SQuAD exact match and F1 (in
    percent) of the decoded answers on the whole validation split, and the window loss. `plan`
    (None for evaluation only) says which windows each step and rank takes."""

    def __init__(self, *, train: Windows | None, val: tuple[list[QAExample], Windows] | None,
                 plan: EpochPlan | None, device: torch.device, pad_id: int,
                 eval_batch_size: int = 32, n_best: int = 20, max_answer_length: int = 30):
        self.train, self.val, self.plan = train, val, plan
        self.device, self.pad_id, self.eval_batch_size = device, pad_id, eval_batch_size
        self.n_best, self.max_answer_length = n_best, max_answer_length

    def train_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        shares = self.plan.micro_batches(step)
        if not shares:  # no window for this rank in this step (EpochPlan.micro_batches)
            stand_in = collate(self.train, self.plan.stand_in(step), pad_id=self.pad_id,
                               device=self.device)
            return [without_targets(stand_in, ["start_positions", "end_positions"])]
        return [collate(self.train, rows, pad_id=self.pad_id, device=self.device)
                for rows in shares]

    def num_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return 0 if batch.get(NO_TARGETS) else batch["start_positions"].numel()

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return summed_span_loss(*span_logits_of(model, batch), batch)

    def predict(self, model, examples: Sequence[QAExample],
                windows: Windows) -> tuple[list[tuple[str, float]], float]:
        starts, ends, loss = window_logits(model, windows, batch_size=self.eval_batch_size,
                                           pad_id=self.pad_id, device=self.device)
        spans = best_spans(examples, windows, starts, ends, n_best=self.n_best,
                           max_answer_length=self.max_answer_length)
        return spans, loss

    def evaluate(self, model, *, final: bool = False) -> dict[str, float]:
        if self.val is None:
            return {}
        examples, windows = self.val
        spans, loss = self.predict(model, examples, windows)
        scores = squad_scores({e.id: text for e, (text, _) in zip(examples, spans)},
                              [(e.id, e.answers) for e in examples])
        return {"val_loss": loss, **{f"val_{k}": v for k, v in scores.items()}}
