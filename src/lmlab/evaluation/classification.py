"""Classification metrics: accuracy, macro-F1, the confusion matrix, and a picture of it.

Macro-F1 averages the per-class F1 over the classes that occur in the gold labels or the
predictions — scikit-learn's `f1_score(average="macro")` — so a class that is never gold and
never predicted does not count, while one that is predicted but never gold scores 0.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def confusion_matrix(gold: Sequence[int], predicted: Sequence[int], num_classes: int) -> np.ndarray:
    """counts[g, p]: examples of gold class g predicted as p, shape (num_classes, num_classes)."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(gold, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return counts


def classification_metrics(gold: Sequence[int], predicted: Sequence[int], num_classes: int, *,
                           exclude: int | None = None) -> dict[str, float]:
    """accuracy and macro_f1; with `exclude` (e.g. CLINC150's out-of-scope class) also
    in_scope_accuracy — accuracy over the examples whose gold class is not `exclude`, the figure
    CLINC150 reports — and exclude_recall (how many of those examples were recognised)."""
    gold, predicted = np.asarray(gold, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if gold.size == 0:
        return {}
    counts = confusion_matrix(gold, predicted, num_classes)
    true_pos = np.diag(counts).astype(np.float64)
    gold_per_class, pred_per_class = counts.sum(1), counts.sum(0)
    present = (gold_per_class + pred_per_class) > 0
    # F1 = 2·TP / (gold + predicted): the same as 2PR/(P+R), and 0 where TP is 0.
    f1 = 2 * true_pos[present] / (gold_per_class[present] + pred_per_class[present])
    out = {"accuracy": float((gold == predicted).mean()), "macro_f1": float(f1.mean())}
    if exclude is not None:
        inside = gold != exclude
        if inside.any():
            out["in_scope_accuracy"] = float((gold[inside] == predicted[inside]).mean())
        if (~inside).any():
            out["exclude_recall"] = float((predicted[~inside] == exclude).mean())
    return out


def top_confusions(counts: np.ndarray, names: Sequence[str], k: int = 20) -> list[tuple[str, str, int]]:
    """The k most frequent (gold, predicted, count) errors, most frequent first."""
    off = counts.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:k]
    pairs = [(int(i) // counts.shape[1], int(i) % counts.shape[1]) for i in order]
    return [(names[g], names[p], int(off[g, p])) for g, p in pairs if off[g, p] > 0]


def plot_confusion(counts: np.ndarray, names: Sequence[str], out: Path, *, title: str = "",
                   max_labelled: int = 30) -> Path:
    """Write the confusion matrix as a PNG (rows: gold, columns: predicted, row-normalised colour).

    Up to `max_labelled` classes every cell is labelled with its count. Beyond that (CLINC150 has
    151) the matrix stays a heat map without tick labels, and a side panel lists the most
    frequent confusions by name, which is what one reads such a matrix for.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    n = counts.shape[0]
    rows = counts.sum(1, keepdims=True)
    normalised = counts / np.maximum(rows, 1)
    small = n <= max_labelled
    size = max(6.0, 0.45 * n) if small else 9.0
    fig, axes = plt.subplots(1, 1 if small else 2, figsize=(size if small else 16, size),
                             dpi=110, squeeze=False,
                             gridspec_kw=None if small else {"width_ratios": [1.1, 1]})
    ax = axes[0][0]
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if small:
        ax.set_xticks(range(n), names, rotation=45 if n > 2 else 0, ha="right" if n > 2 else "center")
        ax.set_yticks(range(n), names)
        for g in range(n):
            for p in range(n):
                ax.text(p, g, str(counts[g, p]), ha="center", va="center", fontsize=8,
                        color="white" if normalised[g, p] > 0.5 else "black")
    else:
        side = axes[0][1]
        side.axis("off")
        lines = [f"{c:>4}  {g}  →  {p}" for g, p, c in top_confusions(counts, names, k=40)]
        side.text(0, 1, "most frequent confusions (count  gold → predicted)\n\n" + "\n".join(lines),
                  va="top", ha="left", family="monospace", fontsize=8)
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    fig.suptitle(f"{title}  accuracy {accuracy:.2%}  ({counts.sum()} examples)".strip(), fontsize=10)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
