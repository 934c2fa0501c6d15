"""Loss curves (and learning rate) as PNG, drawn from metrics.jsonl."""

from __future__ import annotations

import os
from pathlib import Path

from lmlab.training.tracking import read_metrics


def plot_run(run_dir: Path, *, out: Path | None = None) -> Path | None:
    """Write RUN_DIR/loss.png: train and validation loss against step, LR on a second axis."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["train_loss"]) for r in records if isinstance(r.get("train_loss"), float)]
    val = [(r["step"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), float)]
    lrs = [(r["step"], r["lr"]) for r in records if isinstance(r.get("lr"), float)]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", linewidth=2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs), color="gray", linestyle=":", linewidth=1, label="learning rate")
        ax2.set_ylabel("learning rate")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    else:
        ax.legend(loc="upper right")
    ax.set_title(Path(run_dir).resolve().name)
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run_dir) / "loss.png"
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
