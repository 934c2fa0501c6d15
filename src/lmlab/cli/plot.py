from __future__ import annotations

from pathlib import Path

from lmlab.errors import DataError
from lmlab.training.plots import plot_run


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl")


def run(args) -> int:
    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        raise DataError(f"{args.run_dir}: no metrics.jsonl; expected a run directory")
    out = plot_run(Path(args.run_dir))
    print(out if out else f"{args.run_dir}: metrics.jsonl holds no losses yet")
    return 0
