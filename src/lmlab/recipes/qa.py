"""Recipe `qa` (`lmlab finetune qa`): extractive question answering (SQuAD v1.1 format) on a
pretrained BERT encoder with a span head.

RUN_DIR also holds, for the test split (else validation), `predictions_<split>.jsonl` (id,
question, answer, score, gold answers, EM, F1) and `predictions_<split>.json`, the official
{id: answer} form for evaluate-v1.1.py.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.errors import ConfigError, DataError
from lmlab.evaluation.squad import best_over_gold, squad_scores
from lmlab.fileio import atomic_write_bytes
from lmlab.models.bert import BertForQuestionAnswering
from lmlab.recipes import run_steps
from lmlab.recipes.finetuning import (adapt, FinetuneConfig, FinetuneResult, FinetunedRun, check_model,
                                      family_class, finetuning_optim, finish, pad_id, start,
                                      train_epochs)
from lmlab.recipes.registry import Recipe, register_recipe
from lmlab.tasks import qa
from lmlab.tokenizer import Tokenizer
from lmlab.training.loop import OptimConfig

log = logging.getLogger(__name__)

# The span models and how each starts from a pretrained encoder with a new head.
SPAN_MODELS = {BertForQuestionAnswering: BertForQuestionAnswering.from_encoder}


def qa_optim() -> OptimConfig:
    return finetuning_optim(metric="val_f1")


@dataclass
class FinetuneQAConfig(FinetuneConfig):
    max_length: int = 384
    stride: int = 128  # tokens shared by consecutive windows of a long context
    max_answer_length: int = 30  # the longest answer span, in tokens
    n_best: int = 20  # start and end candidates per window
    negatives: int = 0  # per training question, this many unanswerable BM25-ranked other contexts
    # SQuAD files hold articles; these pick some by title (e.g. one half of a set for training)
    train_titles: list[str] | None = None
    validation_titles: list[str] | None = None  # the same, for the validation file
    test_titles: list[str] | None = None  # the same, for the test file
    optim: OptimConfig = field(default_factory=qa_optim)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.stride < self.max_length:
            raise ConfigError(f"stride must be in [0, max_length), got {self.stride} with "
                              f"max_length {self.max_length}")
        if self.max_answer_length <= 0 or self.n_best <= 0:
            raise ConfigError("max_answer_length and n_best must be positive")
        if self.negatives < 0:
            raise ConfigError(f"negatives must be >= 0, got {self.negatives}")


def read_windows(cfg: FinetuneQAConfig, path: str | Path, titles, tokenizer: Tokenizer, *,
                 negatives: int = 0):
    """(examples, windows) of a SQuAD-format file, the articles `titles` names (all if None),
    with `negatives` unanswerable contexts per question (qa.with_negatives)."""
    examples = qa.with_negatives(qa.read_squad(Path(path), titles=titles), negatives)
    return examples, qa.make_windows(tokenizer, examples, max_length=cfg.max_length,
                                     stride=cfg.stride)


def _task(cfg: FinetuneQAConfig, tokenizer: Tokenizer, device, *, train=None, val=None,
          plan=None) -> qa.QATask:
    """The QA task; without data (train, val, plan) it only decodes spans."""
    return qa.QATask(train=train, val=val, plan=plan, device=device, pad_id=pad_id(tokenizer),
                     eval_batch_size=cfg.eval_size, n_best=cfg.n_best,
                     max_answer_length=cfg.max_answer_length)


@run_steps.undo_on_failure
def finetune_qa(cfg: FinetuneQAConfig, *, run_dir: str | Path, resume: bool = False,
                progress: bool = True) -> FinetuneResult:
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    dist, device, model_dir = start(cfg, run_dir, resume=resume)
    cls = family_class(model_dir, SPAN_MODELS)
    if cls is None:
        raise ConfigError(f"model: {model_dir} is not a BERT encoder; extractive QA needs one")
    tokenizer = Tokenizer.from_pretrained(model_dir)
    train_examples, train_windows = read_windows(cfg, cfg.train, cfg.train_titles, tokenizer,
                                                 negatives=cfg.negatives)
    if cfg.negatives:
        unanswerable = sum(not e.answers for e in train_examples)
        log.info("training on %d questions and %d unanswerable negatives (%d windows)",
                 len(train_examples) - unanswerable, unanswerable, len(train_windows))
    val = read_windows(cfg, cfg.validation, cfg.validation_titles, tokenizer)
    test = read_windows(cfg, cfg.test, cfg.test_titles, tokenizer) if cfg.test else None
    model = dist.place(adapt(cfg, SPAN_MODELS[cls](model_dir)), device)
    check_model(cfg, model, tokenizer, model_dir)
    task = _task(cfg, tokenizer, device, train=train_windows, val=val,
                 plan=cfg.plan(train_windows.lengths, dist))
    result = train_epochs(cfg, model, task, recipe="qa", run_dir=run_dir,
                          device=device, dist=dist, resume=resume, progress=progress)
    if not dist.is_main:  # under torchrun rank 0 alone saves and reports
        return finish(run_dir, result, started=t0, test=None, predictions=None, write=False)
    run_steps.save_model(model, tokenizer, run_dir, max_length=cfg.max_length,
                         base=model_dir)
    split, (examples, windows) = ("test", test) if test else ("validation", val)
    model.eval()
    scores, predictions = _report(model, task, examples, windows,
                                  out=run_dir / f"predictions_{split}.jsonl")
    return finish(run_dir, result, started=t0, test=scores if test else None,
                  predictions=predictions)


def _report(model, task: qa.QATask, examples, windows, *,
            out: Path) -> tuple[dict[str, float], Path]:
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
    run_steps.write_jsonl(out, rows)
    official = {e.id: text for e, (text, _) in zip(examples, spans)}
    beside = out.with_suffix(".json") if out.suffix != ".json" else out.with_suffix(".answers.json")
    atomic_write_bytes(beside, json.dumps(official, ensure_ascii=False).encode())
    labelled = [(e.id, e.answers) for e in examples if e.answers]
    return (squad_scores(official, labelled) if labelled else {}), out


# -- a fine-tuned run: evaluate and predict ------------------------------------------------------
def evaluate_run(run: FinetunedRun, data: Path) -> dict[str, float]:
    examples, windows = read_windows(run.cfg, data, None, run.tokenizer)
    if not any(e.answers for e in examples):
        raise DataError(f"{data}: no gold answers to evaluate against")
    task = _task(run.cfg, run.tokenizer, run.device)
    spans, _ = task.predict(run.model, examples, windows)
    return squad_scores({e.id: t for e, (t, _) in zip(examples, spans)},
                        [(e.id, e.answers) for e in examples if e.answers])


def predict_run(run: FinetunedRun, data: Path, out: Path) -> Path:
    examples, windows = read_windows(run.cfg, data, None, run.tokenizer)
    task = _task(run.cfg, run.tokenizer, run.device)
    return _report(run.model, task, examples, windows, out=out)[1]


register_recipe(Recipe(
    name="qa", command="finetune", config=FinetuneQAConfig, run=finetune_qa,
    models=tuple(SPAN_MODELS), evaluate=evaluate_run, predict=predict_run,
    help="extractive question answering (SQuAD v1.1 format) on a BERT encoder",
))
