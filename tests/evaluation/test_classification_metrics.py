"""Accuracy, macro-F1 (scikit-learn's definition), CLINC150's in-scope accuracy, and the
confusion-matrix picture for a few and for many classes."""

from __future__ import annotations

import numpy as np
import pytest

from lmlab.evaluation.classification import (classification_metrics, confusion_matrix,
                                             plot_confusion, top_confusions)


def test_hand_computed_macro_f1():
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    # class 0: P 2/2, R 2/3 → 0.8; class 1: P 1/2, R 1/2 → 0.5; class 2: P 1/2, R 1/1 → 2/3
    m = classification_metrics(gold, pred, 4)  # class 3 never occurs: not averaged
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_predicted_but_never_gold_class_counts_as_zero():
    m = classification_metrics([0, 0], [0, 1], 2)
    # class 0: P 1, R 1/2 → 2/3; class 1: no gold, one prediction → 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_matches_scikit_learn_when_available():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 7, 300), rng.integers(0, 6, 300)
    m = classification_metrics(gold, pred, 7)
    assert m["macro_f1"] == pytest.approx(metrics.f1_score(gold, pred, average="macro"))


def test_in_scope_accuracy_leaves_out_the_excluded_class():
    gold = [0, 1, 2, 2, 2]  # 2 = out of scope
    pred = [0, 2, 2, 0, 2]
    m = classification_metrics(gold, pred, 3, exclude=2)
    assert m["in_scope_accuracy"] == pytest.approx(1 / 2)
    assert m["exclude_recall"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(3 / 5)


def test_confusion_matrix_and_top_confusions():
    counts = confusion_matrix([0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 0, 2], 3)
    assert counts.tolist() == [[1, 1, 0], [1, 0, 2], [0, 0, 1]]
    assert top_confusions(counts, ["a", "b", "c"], k=2) == [("b", "c", 2), ("a", "b", 1)]


@pytest.mark.parametrize("n", [3, 151])
def test_confusion_png(tmp_path, n):
    rng = np.random.default_rng(0)
    gold = rng.integers(0, n, 20 * n)
    pred = np.where(rng.random(gold.size) < 0.8, gold, rng.integers(0, n, gold.size))
    out = plot_confusion(confusion_matrix(gold, pred, n), [f"intent_{i}" for i in range(n)],
                         tmp_path / "c.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))
