"""Run metrics: one JSON object per event in RUN_DIR/metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmlab.errors import DataError
from lmlab.fileio import atomic_write_bytes


class MetricsLog:
    def __init__(self, run_dir: Path, *, tensorboard: bool, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop events logged after the checkpoint we resume from: they will be logged
            # again, identically, so the curve has no duplicates. (A run killed mid-write may
            # have left half a line.) Rewritten atomically: a kill now must not lose the log.
            kept = [json.dumps(r) for r in _parse(_text(self.path))
                    if r.get("step", 0) <= resume_step]
            atomic_write_bytes(self.path, "".join(line + "\n" for line in kept).encode())
        elif resume_step is None:
            self.path.write_text("")
        self._file = self.path.open("a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            # Imported lazily: TensorBoard's import costs about a second.
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events a killed run logged after its last checkpoint
            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                         purge_step=None if resume_step is None
                                         else resume_step + 1)

    def log(self, step: int, **values: Any) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    text = _text(path)
    records = _parse(text)
    if not records and text.strip():
        raise DataError(f"{path}: no line is a JSON object; expected the metrics log an lmlab "
                        "run writes (one JSON object per line)")
    return records


def _text(path: Path) -> str:
    # A run killed mid-write may have cut a character in half: that line is skipped below.
    return path.read_bytes().decode("utf-8", errors="replace")


def _parse(text: str) -> list[dict[str, Any]]:
    """The events of metrics.jsonl; an unreadable line (half-written by a killed run) is
    skipped."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
