from __future__ import annotations

from pathlib import Path

from lmlab.errors import DataError
from lmlab.training.plots import plot_paths, plot_run


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl")


def run(args) -> int:
    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        raise DataError(f"{args.run_dir}: no metrics.jsonl; expected a run directory")
    if plot_run(Path(args.run_dir)) is None:
        print(f"{args.run_dir}: metrics.jsonl holds no losses yet")
        return 0
    for path in plot_paths(Path(args.run_dir)):
        print(path)
    return 0
