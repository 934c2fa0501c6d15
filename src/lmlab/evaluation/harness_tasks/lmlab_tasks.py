"""Datasets of the tasks lmlab ships, read from local files only (never the hub).

The task YAMLs beside this file name these loaders as `custom_dataset`; the harness calls them
with the task's metadata, where `data_root` (the folder holding sst2/, ag_news/, wikitext2/) comes
from `lmlab eval harness --data-root` or `lm-eval run --metadata '{"data_root": "…"}'`; without
one, $LMLAB_DATA_ROOT, else ../shared/data from the working directory. The harness passes every
metadata key (version, model arguments, …), hence the `**_` on each loader.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import datasets
from lm_eval.tasks.wikitext.preprocess_wikitext import (  # noqa: F401  (named by the YAML)
    process_results as wikitext_process_results,
    wikitext_detokenizer,
)

from lmlab.errors import DataError

DEFAULT_DATA_ROOT = "../shared/data"


def _root(data_root: str | None) -> Path:
    return Path(data_root or os.environ.get("LMLAB_DATA_ROOT") or DEFAULT_DATA_ROOT)


def _file(data_root: str | None, *parts: str) -> Path:
    path = _root(data_root).joinpath(*parts)
    if not path.is_file():
        raise DataError(f"{path}: missing (set the data root: lmlab eval harness "
                                f"--data-root DIR, or --metadata '{{\"data_root\": \"DIR\"}}')")
    return path


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _splits(data_root: str | None, folder: str, names=("train", "validation", "test")):
    return datasets.DatasetDict({name: datasets.Dataset.from_list(
        _jsonl(_file(data_root, folder, f"{name}.jsonl"))) for name in names})


def sst2(*, data_root: str | None = None, **_) -> datasets.DatasetDict:
    """SST-2 sentences ({"sentence", "label"}: 0 negative, 1 positive)."""
    return _splits(data_root, "sst2")


def ag_news(*, data_root: str | None = None, **_) -> datasets.DatasetDict:
    """AG News ({"title", "description", "label"}: World, Sports, Business, Sci/Tech)."""
    return _splits(data_root, "ag_news")


HEADING = re.compile(r"^ = [^=].* = $")


def wikitext2(*, data_root: str | None = None, **_) -> datasets.DatasetDict:
    """WikiText-2 (v1, tokenised) test split as one row per article ({"page"}), cut at the
    top-level headings as the harness's `wikitext_document_level` dataset is: 62 articles."""
    lines = _file(data_root, "wikitext2", "wiki.test.tokens").read_text(
        encoding="utf-8").split("\n")
    pages, current = [], []
    for line in lines:
        if HEADING.match(line) and any(part.strip() for part in current):
            pages.append("\n".join(current))
            current = []
        current.append(line)
    if any(part.strip() for part in current):
        pages.append("\n".join(current))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"page": p} for p in pages])})
