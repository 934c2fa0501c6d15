"""Epoch-based batching of variable-length examples, shared by the fine-tuning tasks.

Batches are a pure function of (seed, step): epoch = step // steps_per_epoch, and the epoch's
order is a permutation seeded by (seed, epoch) — so a resumed run sees exactly the batches the
uninterrupted run would have seen, and every rank computes the same plan and takes its slice.

Length grouping (the default) sorts the shuffled examples by length within chunks of
`chunk_batches` batches and then shuffles the batch order: every batch holds examples of similar
length, so dynamic padding wastes little, while the epoch stays random at the scale of chunks.
This is transformers' `group_by_length` idea (its LengthGroupedSampler uses 50-batch chunks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


class EpochPlan:
    """Which examples each optimizer step trains on: `global_batch` = batch_size × grad_accum ×
    world_size examples per step, this rank's strided share of them in micro-batches of
    `batch_size`."""

    def __init__(self, lengths: Sequence[int], *, batch_size: int, grad_accum: int = 1,
                 seed: int, group_by_length: bool = True, chunk_batches: int = 50,
                 rank: int = 0, world_size: int = 1):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.size == 0:
            raise ValueError("no training examples")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.global_batch = batch_size * grad_accum * world_size
        self.seed, self.group_by_length, self.chunk_batches = seed, group_by_length, chunk_batches
        self.steps_per_epoch = math.ceil(self.lengths.size / self.global_batch)
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def batch(self, step: int) -> np.ndarray:
        """Example indices of the global batch of optimizer step `step`."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._epoch(epoch))
        return self._cached[1][index]

    def micro_batches(self, step: int) -> list[np.ndarray]:
        """This rank's share of the global batch (strided, so lengths stay alike), split into
        micro-batches. Empty when the step's batch — the last of an epoch — holds fewer examples
        than there are ranks and this rank gets none: the task then trains a `stand_in`."""
        mine = self.batch(step)[self.rank::self.world_size]
        return [mine[i:i + self.batch_size] for i in range(0, mine.size, self.batch_size)]

    def stand_in(self, step: int) -> np.ndarray:
        """The rows a rank with no example in `step` runs without targets (`without_targets`):
        DDP's gradient all-reduce needs a backward from every rank, and this one adds zeros."""
        return self.batch(step)[:1]

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.lengths.size)
        if not self.group_by_length:
            return np.array_split(order, self.steps_per_epoch)
        chunk = self.chunk_batches * self.global_batch
        batches: list[np.ndarray] = []
        for start in range(0, order.size, chunk):
            part = order[start:start + chunk]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            batches.extend(part[i:i + self.global_batch] for i in range(0, part.size, self.global_batch))
        return [batches[i] for i in rng.permutation(len(batches))]


# A micro-batch marked so (by `without_targets`) counts no targets and its loss adds nothing.
NO_TARGETS = "no_targets"


def without_targets(batch: dict, keys: Sequence[str]) -> dict:
    """`batch` (a rank's stand-in, EpochPlan.stand_in) with the targets under `keys` set to -100,
    cross-entropy's ignore_index: its loss is a zero that still reaches every parameter."""
    for key in keys:
        batch[key] = torch.full_like(batch[key], -100)
    batch[NO_TARGETS] = True
    return batch


def pad_rows(rows: Sequence[np.ndarray], pad: int) -> torch.Tensor:
    """(B, T) int64 tensor of `rows`, right-padded with `pad` to the longest row."""
    out = np.full((len(rows), max(len(r) for r in rows)), pad, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return torch.from_numpy(out)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Evaluation order: longest first, so each batch pads to almost nothing (results are
    scattered back to the original order by the caller)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, order.size, batch_size)]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch tensor on `device`: for CUDA through pinned memory, so the copy runs
    asynchronously (a plain `non_blocking=True` copy from pageable memory waits for the GPU)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
