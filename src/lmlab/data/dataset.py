"""A prepared token dataset on disk, and the batches a causal LM trains and evaluates on.

Layout of a dataset directory (written by `lmlab.data.prepare.prepare_dataset`):
`meta.json` (a `DatasetInfo`), one raw `<split>.bin` array of token ids per split, its document
index `<split>.docs.bin` (int64 end offsets, one per document; datasets prepared before it
existed lack it and say `document_index: false`), and the tokenizer files. Splits are memory-mapped read-only, so opening a dataset costs nothing and many
processes (DDP ranks, data-loader workers) share one page cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from lmlab.errors import ConfigError, DataError

FORMAT = "lmlab-tokens-v1"
META_FILE = "meta.json"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
DOC_DTYPE = np.dtype("<i8")


def docs_path(root: Path, split: str) -> Path:
    return Path(root) / f"{split}.docs.bin"


@dataclass(frozen=True)
class SplitInfo:
    tokens: int
    # Documents with at least one token in the split; with the tail split a document cut in two
    # counts on both sides.
    documents: int


@dataclass(frozen=True)
class DatasetInfo:
    """The contents of `meta.json`, field for field."""

    dtype: str
    vocab_size: int
    eos_token_id: int | None
    tokenizer_fingerprint: str
    splits: dict[str, SplitInfo]
    sources: list[str]
    split: str  # how val was chosen: "document", "tail" or "sources" (given val_sources)
    val_fraction: float | None  # None when val came from val_sources
    val_sources: list[str] | None = None
    format: str = FORMAT
    document_index: bool = False  # <split>.docs.bin files exist (all datasets prepared since)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object, *, where: Path) -> DatasetInfo:
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a JSON object")
        if data.get("format") != FORMAT:
            raise DataError(f"{where}: format is {data.get('format')!r}, expected {FORMAT!r}")
        required = ("dtype", "vocab_size", "eos_token_id", "tokenizer_fingerprint", "splits",
                    "sources", "split", "val_fraction")
        missing = [key for key in required if key not in data]
        if missing:
            raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise DataError(f"{where}: unknown field(s) {', '.join(unknown)}")
        if data["dtype"] not in DTYPES:
            raise DataError(
                f"{where}: dtype must be one of {sorted(DTYPES)}, got {data['dtype']!r}"
            )
        try:
            splits = {name: SplitInfo(tokens=int(s["tokens"]), documents=int(s["documents"]))
                      for name, s in data["splits"].items()}
        except (AttributeError, KeyError, TypeError, ValueError):
            raise DataError(f"{where}: 'splits' must map names to {{tokens, documents}}") from None
        return cls(**{**data, "splits": splits})


def _bin_path(root: Path, split: str) -> Path:
    return root / f"{split}.bin"


@dataclass(frozen=True)
class TokenDataset:
    path: Path
    meta: DatasetInfo

    @classmethod
    def open(cls, path: str | Path) -> TokenDataset:
        """Read and check `meta.json`; every split file must hold exactly its token count."""
        root = Path(path)
        meta_path = root / META_FILE
        if not meta_path.is_file():
            raise DataError(
                f"{root}: not a prepared dataset (no {META_FILE}); run `lmlab prepare` first"
            )
        try:
            data = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{meta_path}: not valid JSON ({err})") from None
        dataset = cls(path=root, meta=DatasetInfo.from_json(data, where=meta_path))
        for name in dataset.meta.splits:
            dataset._check_size(name)
        return dataset

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.meta.dtype])

    @property
    def vocab_size(self) -> int:
        return self.meta.vocab_size

    @property
    def eos_token_id(self) -> int | None:
        return self.meta.eos_token_id

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.meta.tokenizer_fingerprint

    def _check_size(self, name: str) -> Path:
        file = _bin_path(self.path, name)
        expected = self.meta.splits[name].tokens * self.dtype.itemsize
        actual = file.stat().st_size if file.is_file() else None
        if actual != expected:
            found = "missing" if actual is None else f"{actual} bytes"
            raise DataError(
                f"{file}: {found}, expected {expected} bytes ({self.meta.splits[name].tokens} "
                f"{self.meta.dtype} tokens); the file is truncated or modified, run "
                "`lmlab prepare` again"
            )
        return file

    def document_ends(self, name: str) -> np.ndarray | None:
        """End offsets (exclusive, int64) of the documents of split `name` in its token array,
        memory-mapped; None for a dataset prepared without a document index."""
        if not self.meta.document_index:
            return None
        self.split(name)  # checks the name and the token file
        file, count = docs_path(self.path, name), self.meta.splits[name].documents
        actual = file.stat().st_size if file.is_file() else None
        if actual != count * DOC_DTYPE.itemsize:
            found = "missing" if actual is None else f"{actual} bytes"
            raise DataError(f"{file}: {found}, expected {count * DOC_DTYPE.itemsize} bytes"
                            f" ({count} documents); run `lmlab prepare` again")
        if count == 0:
            return np.empty(0, dtype=DOC_DTYPE)
        return np.memmap(file, dtype=DOC_DTYPE, mode="r")

    def split(self, name: str) -> np.ndarray:
        """The tokens of split `name`, memory-mapped read-only (an empty array if it has none)."""
        if name not in self.meta.splits:
            raise DataError(f"{self.path}: no split {name!r}; it has {sorted(self.meta.splits)}")
        file = self._check_size(name)
        if self.meta.splits[name].tokens == 0:
            return np.empty(0, dtype=self.dtype)  # mmap cannot map an empty file
        return np.memmap(file, dtype=self.dtype, mode="r")


def _check_length(tokens: np.ndarray, block_size: int) -> None:
    if len(tokens) < block_size + 1:
        raise DataError(
            f"split has {len(tokens)} tokens, but block_size={block_size} needs at least "
            f"{block_size + 1}; use more data or a smaller block_size"
        )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")


def sample_batch(
    tokens: np.ndarray, *, batch_size: int, block_size: int, seed: int, step: int,
    rank: int = 0, world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows `x = tokens[i:i+T]`, `y = tokens[i+1:i+T+1]` as int64 tensors `(B, T)`.

    The offsets are a pure function of `(seed, step)`: the global batch of
    `batch_size * world_size` offsets is drawn and this rank takes rows
    `[rank * batch_size, (rank + 1) * batch_size)`. So a resumed run sees the same batches, and
    the ranks together see exactly the batch one process would.
    """
    _check_positive(batch_size=batch_size, block_size=block_size, world_size=world_size)
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
    if seed < 0 or step < 0:
        raise ConfigError(f"seed and step must be >= 0, got seed={seed}, step={step}")
    _check_length(tokens, block_size)
    rng = np.random.default_rng([seed, step])
    offsets = rng.integers(0, len(tokens) - block_size, size=batch_size * world_size)
    mine = offsets[rank * batch_size:(rank + 1) * batch_size]
    # One fancy-indexing gather of all windows, (B, T+1); far faster than a Python loop of slices.
    windows = tokens[mine[:, None] + np.arange(block_size + 1)].astype(np.int64)
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))  # (B, T)
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))  # (B, T)
    return x, y


def iter_eval_batches(
    tokens: np.ndarray, *, batch_size: int, block_size: int, max_tokens: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows (stride `block_size`) over the split, in order, for evaluation.

    Covers `(n - 1) // block_size` windows of the first `n = min(len(tokens), max_tokens)`
    tokens; the last partial window is dropped and the last batch may be smaller.
    """
    _check_positive(batch_size=batch_size, block_size=block_size)
    if max_tokens is not None:
        _check_positive(max_tokens=max_tokens)
        tokens = tokens[:max_tokens]
    _check_length(tokens, block_size)
    windows = (len(tokens) - 1) // block_size
    for first in range(0, windows, batch_size):
        count = min(batch_size, windows - first)
        # Consecutive windows are one contiguous region: a slice and a reshape, no gather.
        region = np.asarray(tokens[first * block_size:(first + count) * block_size + 1], np.int64)
        x = torch.from_numpy(region[:-1].reshape(count, block_size))  # (b, T)
        y = torch.from_numpy(region[1:].reshape(count, block_size))  # (b, T)
        yield x, y
