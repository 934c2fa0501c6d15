"""Open-domain QA (`lmlab qa ask`): retrieve passages from an index (evaluation/retrieval.py),
read each with a fine-tuned extractive QA run (`lmlab finetune qa`), rank the answers.

The reader is the QA task's own decoding (tasks/qa.py: windows, n-best start/end logits, the best
span per passage, scored by start + end logit; for a reader trained with negative passages,
`negatives` > 0, minus the window's [CLS] no-answer logits, which that training makes comparable
across passages). An answer's score combines that span score with the passage's retrieval rank:

    score = span score − retrieval_weight · ln(rank)       (rank from 1)

so the reader decides among passages it reads with similar confidence, and a passage ranked far
down must read markedly better to win. Ranks, not raw retrieval scores, because BM25 scores,
cosine similarities and fused RRF scores are on unrelated scales; retrieval_weight = 0 ranks by
the reader alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import ConfigError, DataError
from lmlab.evaluation.retrieval import (RRF_K, Hit, Index, build_index, load_encoder,
                                        read_passages)
from lmlab.evaluation.squad import normalize_answer
from lmlab.recipes.finetuning import FinetunedRun, pad_id, resolve_model
from lmlab.tasks import qa


@dataclass
class Answer:
    text: str
    score: float  # the combined score (see the module docstring)
    span_score: float  # the reader's start + end logit (− its no-answer logits: see above)
    retrieval: Hit  # the passage it was read from: index, retrieval score, rank
    title: str
    passage: str


def check_reader(run: FinetunedRun) -> None:
    if run.recipe.name != "qa":
        raise ConfigError(f"--reader: a run of recipe {run.recipe.name!r}; open-domain QA reads "
                          "with an extractive QA run (lmlab finetune qa)")


def relative_scores(run: FinetunedRun) -> bool:
    """Whether the reader's span scores are taken relative to its no-answer score: only a reader
    trained with negative passages has learned one."""
    return getattr(run.cfg, "negatives", 0) > 0


def read(run: FinetunedRun, question: str, passages: Sequence[str], *,
         relative: bool | None = None) -> list[tuple[str, float]]:
    """(answer text, span score) of the reader's best span in each passage; ("", -inf) when it
    finds none. `relative` (default: `relative_scores(run)`) scores spans minus their window's
    no-answer logits. A question that leaves no room for a passage in the reader's window is an
    error."""
    return decode(run, read_logits(run, question, passages), relative=relative)


def decode(run: FinetunedRun, logits, *,
           relative: float | None = None) -> list[tuple[str, float]]:
    """`read`'s spans from `read_logits`' output: one reading can be decoded several ways."""
    return qa.best_spans(*logits, n_best=run.cfg.n_best,
                         max_answer_length=run.cfg.max_answer_length,
                         relative=relative_scores(run) if relative is None else relative)


def read_logits(run: FinetunedRun, question: str, passages: Sequence[str]):
    """(examples, windows, start logits, end logits) of `question` on each passage: what
    qa.best_spans decodes."""
    cfg = run.cfg
    n = len(run.tokenizer.encode(question.lstrip()))
    if n + 3 >= cfg.max_length:  # [CLS] question [SEP] passage [SEP]: a passage token at least
        raise DataError(f"the question is {n} tokens; the reader reads windows of "
                        f"{cfg.max_length} tokens, question and passage together — ask a "
                        f"question of at most {cfg.max_length - 4} tokens")
    examples = [qa.QAExample(id=str(i), question=question, context=p, answers=[],
                             answer_starts=[]) for i, p in enumerate(passages)]
    windows = qa.make_windows(run.tokenizer, examples, max_length=cfg.max_length,
                              stride=cfg.stride)
    starts, ends, _ = qa.window_logits(run.model, windows, batch_size=cfg.eval_size,
                                       pad_id=pad_id(run.tokenizer), device=run.device)
    return examples, windows, starts, ends


AGGREGATES = ("max", "sum")


def merge_answers(candidates: Sequence[tuple[str, float]], *,
                  aggregate: str = "max") -> list[tuple[int, float]]:
    """(index into `candidates`, score) of the answers among (text, score) candidates, best
    first. "max": every candidate on its own score. "sum": candidates whose texts are equal after
    SQuAD's normalisation are one answer, scored log Σ exp(score) over them (so an answer that
    several passages give gains on one that a single passage gives), and named by its
    best-scored candidate."""
    if aggregate not in AGGREGATES:
        raise ConfigError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    if aggregate == "max":
        return sorted(((i, score) for i, (_, score) in enumerate(candidates)),
                      key=lambda pair: -pair[1])
    groups: dict[str, list[int]] = {}
    for i, (text, _) in enumerate(candidates):
        groups.setdefault(normalize_answer(text), []).append(i)
    merged = []
    for members in groups.values():
        scores = [candidates[i][1] for i in members]
        top = max(scores)
        merged.append((members[scores.index(top)],
                       top + math.log(sum(math.exp(x - top) for x in scores))))
    return sorted(merged, key=lambda pair: -pair[1])


def answer(question: str, *, index: Index, reader: FinetunedRun, retriever: str = "hybrid",
           top_k: int = 10, retrieval_weight: float = 2.0, n_answers: int = 3,
           rrf_k: int = RRF_K, aggregate: str = "max") -> list[Answer]:
    """The best `n_answers` answers to `question` from the `top_k` passages `retriever` finds,
    best first: one per passage, or with aggregate="sum" one per distinct answer text, scored
    over every passage that gives it (merge_answers), shown with its best passage."""
    if not question.strip():
        raise DataError("the question is empty")
    if top_k < 1 or n_answers < 1:
        raise ConfigError(f"top_k and n_answers must be positive, got {top_k} and {n_answers}")
    check_reader(reader)
    hits = index.search(question, retriever=retriever, top_k=top_k, rrf_k=rrf_k)
    passages = [index.passages[h.passage] for h in hits]
    spans = read(reader, question, [p.text for p in passages])
    answers = [Answer(text=text, score=span - retrieval_weight * math.log(hit.rank),
                      span_score=span, retrieval=hit, title=p.title, passage=p.text)
               for hit, p, (text, span) in zip(hits, passages, spans) if math.isfinite(span)]
    merged = merge_answers([(a.text, a.score) for a in answers], aggregate=aggregate)
    return [dataclasses.replace(answers[i], score=score) for i, score in merged[:n_answers]]


def build(corpus: str | Path, out: str | Path, *, encoder: str | Path | None = None,
          text_field: str = "text", batch_size: int = 64) -> Index:
    """`lmlab qa index`: the passages of `corpus` indexed into the folder `out` with `encoder`
    (all-MiniLM-L6-v2 by default)."""
    passages = read_passages(corpus, text_field=text_field)
    model = resolve_model("minilm") if encoder is None else Path(encoder)
    return build_index(passages, out, encoder=load_encoder(model), batch_size=batch_size)
