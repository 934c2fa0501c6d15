"""SQuAD v1.1 exact match and F1, with the official evaluate-v1.1.py normalisation.

An answer is normalised by lower-casing, removing ASCII punctuation, removing the articles
a / an / the as whole words, and collapsing whitespace — in that order, as the official script
does. F1 is over the bag of normalised tokens; both scores take the maximum over the gold answers,
and the dataset figures are percentages over all questions (an unanswered question scores 0).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    predicted_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    same = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    if same == 0:  # also when either side normalises to nothing
        return 0.0
    precision, recall = same / len(predicted_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_over_gold(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction: each the maximum over the gold answers."""
    return (max(exact_match(prediction, g) for g in golds), max(f1(prediction, g) for g in golds))


def squad_scores(predictions: Mapping[str, str],
                 golds: Iterable[tuple[str, Sequence[str]]]) -> dict[str, float]:
    """{"exact_match", "f1"} in percent over every (question id, gold answers) pair."""
    total = em_sum = f1_sum = 0.0
    for qid, answers in golds:
        total += 1
        if qid in predictions and answers:
            em, f = best_over_gold(predictions[qid], answers)
            em_sum, f1_sum = em_sum + em, f1_sum + f
    if not total:
        return {}
    return {"exact_match": 100.0 * em_sum / total, "f1": 100.0 * f1_sum / total}
