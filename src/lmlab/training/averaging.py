"""Checkpoint averaging: the element-wise mean of a run's last N step checkpoints.

Machine translation has averaged checkpoints since the Transformer paper (the last 5 or 20,
fairseq's `average_checkpoints.py`): the weights at the end of several epochs lie around the
same minimum, and their mean usually lies nearer its floor than any one of them — a BLEU point
or so for free. A fine-tuning run writes a step checkpoint after every epoch; `keep_last: 0`
keeps them all, so the choice of N can be made afterwards, on the validation set.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.errors import CheckpointError
from lmlab.training import checkpoint as ckpt_io


def last_checkpoints(run_dir: Path, n: int) -> list[ckpt_io.Checkpoint]:
    """The newest `n` step checkpoints of RUN_DIR, oldest first, each verified against its
    manifest (a damaged one is an error: silently averaging fewer would change the result)."""
    if n < 1:
        raise CheckpointError(f"--last must be at least 1, got {n}")
    found = ckpt_io.list_checkpoints(run_dir)
    if len(found) < n:
        raise CheckpointError(
            f"{Path(run_dir) / 'checkpoints'}: {len(found)} step checkpoint(s), {n} asked for; "
            "a run keeps its last `keep_last` (2 by default) — train with keep_last: 0 to keep "
            "one per epoch")
    chosen = found[-n:]
    for ckpt in chosen:
        if (problem := ckpt_io.verify(ckpt)) is not None:
            raise CheckpointError(f"{problem}; cannot average a damaged checkpoint")
    return chosen


def average_weights(checkpoints: list[ckpt_io.Checkpoint]) -> dict[str, torch.Tensor]:
    """The mean of the checkpoints' weights, name by name, summed in float64 and returned in
    each tensor's own dtype. Integer tensors (counters, index buffers) are not averaged: they
    must be equal in every checkpoint, and are taken as they are."""
    if not checkpoints:
        raise CheckpointError("no checkpoints to average")
    first, *rest = checkpoints
    weights, _ = ckpt_io.read_checkpoint(first)
    dtypes = {name: t.dtype for name, t in weights.items()}
    total = {name: t.double() if t.is_floating_point() else t for name, t in weights.items()}
    for ckpt in rest:
        weights, _ = ckpt_io.read_checkpoint(ckpt)
        if set(weights) != set(total):
            odd = sorted(set(weights) ^ set(total))[:3]
            raise CheckpointError(f"{ckpt.path}: its weights are not the same set as "
                                  f"{first.path}'s (differ in {odd})")
        for name, tensor in weights.items():
            if tensor.shape != total[name].shape:
                raise CheckpointError(f"{ckpt.path}: weight '{name}' has shape "
                                      f"{tuple(tensor.shape)}, {first.path}'s has "
                                      f"{tuple(total[name].shape)}")
            if tensor.is_floating_point():
                total[name] += tensor.double()
            elif not torch.equal(tensor, total[name]):
                raise CheckpointError(f"{ckpt.path}: integer tensor '{name}' differs from "
                                      f"{first.path}'s; it cannot be averaged")
    n = len(checkpoints)
    return {name: (t / n).to(dtypes[name]) if t.is_floating_point() else t
            for name, t in total.items()}
