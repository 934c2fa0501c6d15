"""Tests for lmlab.data.dataset: opening a prepared dataset and drawing batches from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.data.dataset import (
    DatasetInfo, SplitInfo, TokenDataset, iter_eval_batches, sample_batch,
)
from lmlab.errors import ConfigError, DataError


def make_dataset(root: Path, *, train: np.ndarray, val: np.ndarray) -> Path:
    """Write a dataset by hand, so these tests do not depend on prepare_dataset."""
    root.mkdir()
    train.tofile(root / "train.bin")
    val.tofile(root / "val.bin")
    info = DatasetInfo(
        dtype=train.dtype.name, vocab_size=70_000, eos_token_id=0, tokenizer_fingerprint="fp-1",
        splits={"train": SplitInfo(len(train), 3), "val": SplitInfo(len(val), 1)},
        sources=["corpus/"], split="document", val_fraction=0.1,
    )
    (root / "meta.json").write_text(json.dumps(info.to_json()))
    return root


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    train = np.arange(1000, dtype=np.uint32) * 67  # ids above 2**16 survive the round trip
    return make_dataset(tmp_path / "ds", train=train, val=np.array([5, 6, 7], dtype=np.uint32))


def test_open_exposes_meta_and_read_only_memmaps(dataset_dir: Path) -> None:
    ds = TokenDataset.open(dataset_dir)
    assert ds.vocab_size == 70_000
    assert ds.tokenizer_fingerprint == "fp-1"
    assert ds.meta.splits["val"] == SplitInfo(tokens=3, documents=1)
    train = ds.split("train")
    assert isinstance(train, np.memmap) and train.dtype == np.uint32
    np.testing.assert_array_equal(train, np.arange(1000) * 67)
    with pytest.raises(ValueError):
        train[0] = 1  # read-only: nobody corrupts the dataset by accident
    np.testing.assert_array_equal(ds.split("val"), [5, 6, 7])


def test_empty_split_is_an_empty_array(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", train=np.arange(10, dtype=np.uint16),
                        val=np.array([], dtype=np.uint16))
    assert TokenDataset.open(root).split("val").shape == (0,)


def test_missing_meta_says_how_to_fix_it(tmp_path: Path) -> None:
    message = r"not a prepared dataset \(no meta.json\); run `lmlab prepare` first"
    with pytest.raises(DataError, match=message):
        TokenDataset.open(tmp_path)


def test_truncated_split_file_is_detected_and_named(dataset_dir: Path) -> None:
    data = (dataset_dir / "train.bin").read_bytes()
    (dataset_dir / "train.bin").write_bytes(data[:-6])
    message = r"train.bin: 3994 bytes, expected 4000 bytes \(1000 uint32 tokens\)"
    with pytest.raises(DataError, match=message):
        TokenDataset.open(dataset_dir)


def test_bad_meta_and_unknown_split(dataset_dir: Path) -> None:
    with pytest.raises(DataError, match="no split 'test'"):
        TokenDataset.open(dataset_dir).split("test")
    meta = json.loads((dataset_dir / "meta.json").read_text())
    (dataset_dir / "meta.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(DataError, match="meta.json: format is 'other'"):
        TokenDataset.open(dataset_dir)
    del meta["vocab_size"]
    (dataset_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="meta.json: missing field.*vocab_size"):
        TokenDataset.open(dataset_dir)


TOKENS = np.arange(500, dtype=np.uint16)  # token i at position i: windows reveal their offset


def test_sample_batch_is_windows_with_targets_shifted_by_one() -> None:
    x, y = sample_batch(TOKENS, batch_size=8, block_size=16, seed=0, step=0)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    starts = x[:, :1]
    torch.testing.assert_close(x, starts + torch.arange(16))  # x = tokens[i:i+T]
    torch.testing.assert_close(y, x + 1)  # y = tokens[i+1:i+T+1]


def test_sample_batch_is_a_pure_function_of_seed_and_step() -> None:
    a = sample_batch(TOKENS, batch_size=8, block_size=16, seed=3, step=7)
    b = sample_batch(TOKENS, batch_size=8, block_size=16, seed=3, step=7)
    torch.testing.assert_close(a, b)
    for other in ({"seed": 3, "step": 8}, {"seed": 4, "step": 7}):
        c = sample_batch(TOKENS, batch_size=8, block_size=16, **other)
        assert not torch.equal(a[0], c[0])


def test_rank_slices_concatenate_to_the_single_process_batch() -> None:
    global_x, global_y = sample_batch(TOKENS, batch_size=12, block_size=8, seed=1, step=5)
    parts = [sample_batch(TOKENS, batch_size=4, block_size=8, seed=1, step=5, rank=r, world_size=3)
             for r in range(3)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), global_x)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), global_y)


def test_sample_batch_reaches_the_last_window_and_no_further() -> None:
    tokens = np.arange(11, dtype=np.uint16)
    x, y = sample_batch(tokens, batch_size=4, block_size=10, seed=0, step=0)  # only offset 0 fits
    torch.testing.assert_close(y, torch.arange(1, 11).expand(4, 10))
    x, _ = sample_batch(tokens, batch_size=2000, block_size=5, seed=0, step=0)
    assert set(x[:, 0].tolist()) == set(range(6))  # offsets 0 … n-T-1, all of them


def test_sample_batch_reads_from_a_memmap(dataset_dir: Path) -> None:
    train = TokenDataset.open(dataset_dir).split("train")
    x, y = sample_batch(train, batch_size=4, block_size=32, seed=0, step=0)
    torch.testing.assert_close(y[:, :-1], x[:, 1:])
    assert (x[:, 1:] - x[:, :-1] == 67).all()  # consecutive tokens of train = 67 * arange


def test_too_short_split_says_what_block_size_needs() -> None:
    with pytest.raises(DataError, match="split has 10 tokens, but block_size=10 needs at least 11"):
        sample_batch(np.arange(10), batch_size=1, block_size=10, seed=0, step=0)
    with pytest.raises(DataError, match="split has 10 tokens"):
        next(iter_eval_batches(np.arange(10), batch_size=1, block_size=10))


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"rank must be in \[0, 2\), got 2"):
        sample_batch(TOKENS, batch_size=1, block_size=4, seed=0, step=0, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        sample_batch(TOKENS, batch_size=0, block_size=4, seed=0, step=0)


@pytest.mark.parametrize(("n", "block_size", "batch_size", "windows"),
                         [(103, 10, 4, 10), (101, 10, 4, 10), (100, 10, 3, 9), (11, 10, 5, 1)])
def test_eval_batches_cover_the_split_in_order(n: int, block_size: int, batch_size: int,
                                               windows: int) -> None:
    tokens = np.arange(n, dtype=np.uint16)
    batches = list(iter_eval_batches(tokens, batch_size=batch_size, block_size=block_size))
    assert [len(x) for x, _ in batches[:-1]] == [batch_size] * (len(batches) - 1)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert len(x) == windows == (n - 1) // block_size
    torch.testing.assert_close(x.flatten(), torch.arange(windows * block_size))
    torch.testing.assert_close(y, x + 1)


def test_eval_batches_max_tokens() -> None:
    batches = list(iter_eval_batches(TOKENS, batch_size=100, block_size=10, max_tokens=51))
    assert len(batches) == 1 and batches[0][0].shape == (5, 10)
    assert int(batches[0][1].max()) == 50  # never reads past the first max_tokens tokens
