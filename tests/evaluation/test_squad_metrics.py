"""SQuAD v1.1 exact match and F1 against hand-computed values and against a transcription of the
official evaluate-v1.1.py script."""

from __future__ import annotations

import re
import string
from collections import Counter

import pytest

from lmlab.evaluation.squad import best_over_gold, exact_match, f1, normalize_answer, squad_scores


# -- the official script (evaluate-v1.1.py), transcribed -----------------------------------------
def official_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def official_f1_score(prediction, ground_truth):
    prediction_tokens = official_normalize_answer(prediction).split()
    ground_truth_tokens = official_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def official_exact_match_score(prediction, ground_truth):
    return official_normalize_answer(prediction) == official_normalize_answer(ground_truth)


def official_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def official_evaluate(dataset, predictions):
    f1_ = exact_match_ = total = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue
                ground_truths = [x["text"] for x in qa["answers"]]
                prediction = predictions[qa["id"]]
                exact_match_ += official_metric_max_over_ground_truths(
                    official_exact_match_score, prediction, ground_truths)
                f1_ += official_metric_max_over_ground_truths(official_f1_score, prediction,
                                                              ground_truths)
    return {"exact_match": 100.0 * exact_match_ / total, "f1": 100.0 * f1_ / total}


# -- hand-checked cases: (prediction, gold answers, EM, F1) --------------------------------------
# F1 = 2PR/(P+R) over normalised tokens; reasoning in the comment where it is not obvious.
CASES = [
    ("Denver Broncos", ["Denver Broncos"], 1, 1.0),
    ("denver broncos", ["Denver Broncos"], 1, 1.0),  # case
    ("The Denver Broncos.", ["Denver Broncos"], 1, 1.0),  # article and punctuation
    ("Broncos", ["Denver Broncos"], 0, 2 / 3),  # P 1/1, R 1/2
    ("the Denver Broncos team", ["Denver Broncos"], 0, 0.8),  # P 2/3, R 2/2
    ("Carolina Panthers", ["Denver Broncos"], 0, 0.0),
    ("Santa Clara, California", ["Santa Clara", "Levi's Stadium"], 0, 0.8),  # P 2/3, R 1
    ("Levi's Stadium", ["Santa Clara", "Levi's Stadium", "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California."], 1, 1.0),
    ("Levis Stadium", ["Levi's Stadium"], 1, 1.0),  # the apostrophe is removed, not a space
    ("Levi s Stadium", ["Levi's Stadium"], 0, 0.4),  # "levi s stadium" vs "levis stadium": P 1/3, R 1/2
    ("a", ["an"], 1, 0.0),  # both normalise to "": equal, but no common token
    ("an apple", ["the apple"], 1, 1.0),
    ("Theodore", ["the odore"], 0, 0.0),  # "the" only as a whole word: "theodore" vs "odore"
    ("anthem", ["the anthem"], 1, 1.0),  # "an" inside a word stays
    ("1,000", ["1000"], 1, 1.0),  # the comma is punctuation
    ("1 000", ["1000"], 0, 0.0),
    ("3.5 million", ["3.5 million"], 1, 1.0),
    ("35 million", ["3.5 million"], 1, 1.0),  # "3.5" → "35"
    ("New  York\tCity", ["new york city"], 1, 1.0),  # whitespace collapses
    ("  ", ["anything"], 0, 0.0),
    ("gold gold", ["gold"], 0, 2 / 3),  # P 1/2, R 1 (bag, not set)
    ("gold", ["gold gold"], 0, 2 / 3),  # P 1, R 1/2
    ("gold gold", ["gold gold silver"], 0, 0.8),  # P 2/2, R 2/3
    ("red blue", ["blue red"], 0, 1.0),  # order does not matter for F1
    ("Saint-Denis", ["Saint Denis"], 0, 0.0),  # hyphen removed → "saintdenis"
    ("Saint-Denis", ["SaintDenis"], 1, 1.0),
    ("«Paris»", ["Paris"], 0, 0.0),  # « » are not ASCII punctuation: kept
    ("Paris!", ["paris"], 1, 1.0),
    ("the the the", ["a"], 1, 0.0),  # both empty after removing articles
    ("Ångström", ["ångström"], 1, 1.0),  # Unicode lower-casing
    ("A. Einstein", ["Einstein"], 1, 1.0),  # "a" (from "A.") is an article
    ("Albert Einstein", ["Einstein", "Albert Einstein"], 1, 1.0),
    ("Einstein", ["Albert Einstein", "Einstein's theory"], 0, 2 / 3),  # best: first gold
    ("in 1905", ["1905", "in 1905 and 1915"], 0, 2 / 3),  # vs 1: P 1/2, R 1; vs 2: P 1, R 2/4
    ("the 4th of July", ["July 4"], 0, 0.4),  # "4th of july" vs "july 4": common {july} → P 1/3, R 1/2
    ("x", ["y", "x y", "x"], 1, 1.0),
]


@pytest.mark.parametrize("prediction, golds, em, f", CASES)
def test_hand_checked_cases(prediction, golds, em, f):
    assert best_over_gold(prediction, golds) == (pytest.approx(em), pytest.approx(f))


@pytest.mark.parametrize("prediction, golds, em, f", CASES)
def test_same_as_the_official_script(prediction, golds, em, f):
    assert normalize_answer(prediction) == official_normalize_answer(prediction)
    for gold in golds:
        assert exact_match(prediction, gold) == float(official_exact_match_score(prediction, gold))
        assert f1(prediction, gold) == pytest.approx(official_f1_score(prediction, gold))


def test_dataset_scores_equal_the_official_evaluate():
    dataset = [{"paragraphs": [{"qas": [
        {"id": str(i), "answers": [{"text": g} for g in golds]}
        for i, (_, golds, _, _) in enumerate(CASES)]}]}]
    predictions = {str(i): p for i, (p, _, _, _) in enumerate(CASES) if i % 7 != 3}  # some unanswered
    ours = squad_scores(predictions, [(str(i), golds) for i, (_, golds, _, _) in enumerate(CASES)])
    official = official_evaluate(dataset, predictions)
    assert ours == pytest.approx(official)
    expected_em = 100 * sum(em for i, (_, _, em, _) in enumerate(CASES) if i % 7 != 3) / len(CASES)
    assert ours["exact_match"] == pytest.approx(expected_em)


def test_normalisation_steps():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"
