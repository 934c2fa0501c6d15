"""PNG plots of a run, drawn from metrics.jsonl into the run directory:

- `loss.png`: train and validation loss against step, the learning rate on a second axis;
- `throughput.png`: tokens/s (targets/s when tokens are not counted), MFU on a second axis.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmlab.training.tracking import read_metrics


def plot_run(run_dir: Path, *, out: Path | None = None) -> Path | None:
    """Write RUN_DIR/loss.png (or `out`) and RUN_DIR/throughput.png; return the loss plot's
    path, or None when metrics.jsonl holds no loss yet."""
    records = read_metrics(run_dir)
    _plot_throughput(records, Path(run_dir) / "throughput.png")
    return _plot_loss(records, Path(out) if out is not None else Path(run_dir) / "loss.png",
                      title=Path(run_dir).resolve().name)


def plot_paths(run_dir: Path) -> list[Path]:
    """The plots `plot_run` has written for this run."""
    return [p for p in (Path(run_dir) / "loss.png", Path(run_dir) / "throughput.png")
            if p.is_file()]


def _series(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), float)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _plot_loss(records, out: Path, *, title: str) -> Path | None:
    train, val, lrs = (_series(records, k) for k in ("train_loss", "val_loss", "lr"))
    if not train and not val:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", linewidth=2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    second = [(lrs, "learning rate", "learning rate")] if lrs else []
    return _finish(plt, fig, ax, second, title, out)


def _plot_throughput(records, out: Path) -> Path | None:
    key = "tokens_per_s" if _series(records, "tokens_per_s") else "targets_per_s"
    rate, mfu = _series(records, key), _series(records, "mfu")
    if not rate:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(*zip(*rate), label=key.replace("_per_s", "/s"), linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(key.replace("_per_s", " per second") + " (running mean)")
    second = [([(s, 100 * v) for s, v in mfu], "MFU (%)", "MFU %")] if mfu else []
    return _finish(plt, fig, ax, second, "throughput", out)


def _finish(plt, fig, ax, second, title: str, out: Path) -> Path:
    """Grid, the optional second axis, one legend for both, then an atomic write."""
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    for series, label, ylabel in second:
        ax2 = ax.twinx()
        ax2.plot(*zip(*series), color="gray", linestyle=":", linewidth=1, label=label)
        ax2.set_ylabel(ylabel)
        more = ax2.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
