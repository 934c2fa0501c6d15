"""Batches side by side on one-thread workers (`generation.side_by_side`, which `lmlab translate`,
the translation recipe's evaluation and the dense index use): the same outputs as one batch after
the other, the caller's grad mode in the workers, torch's thread count restored."""

from __future__ import annotations

import threading

import pytest
import torch

import lmlab
from lmlab.generation.side_by_side import batches_at_once, side_by_side
from lmlab.models import from_pretrained


def test_beam_search_batches_side_by_side_equal_one_after_the_other(tiny_t5):
    _, directory = tiny_t5("v1_0")
    model = from_pretrained(directory).eval()
    g = torch.Generator().manual_seed(5)
    batches = []
    for width in (30, 12, 7, 21):  # four batches of 3 sources, the last row padded
        ids = torch.randint(2, 99, (3, width), generator=g)
        mask = torch.ones_like(ids)
        mask[2, width // 2:] = 0
        batches.append((ids.masked_fill(mask == 0, 0), mask))

    def translate(batch):
        ids, mask = batch
        return lmlab.generate(model, source_ids=ids, source_mask=mask, max_new_tokens=12,
                              num_beams=4, length_penalty=0.6, early_stopping=True)

    threads = torch.get_num_threads()
    with torch.inference_mode():
        expected = [translate(batch) for batch in batches]
        got = side_by_side(translate, batches, workers=2)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.get_num_threads() == threads


def test_workers_take_the_callers_grad_mode_and_errors_restore_the_thread_count():
    threads = torch.get_num_threads()
    modes = lambda _: (torch.is_inference_mode_enabled(), torch.is_grad_enabled(),
                       torch.get_num_threads())
    with torch.inference_mode():
        assert side_by_side(modes, range(3), workers=2) == [(True, False, 1)] * 3
    with torch.no_grad():
        assert side_by_side(modes, range(3), workers=2) == [(False, False, 1)] * 3
    assert side_by_side(modes, range(3), workers=2) == [(False, True, 1)] * 3

    def fails(item):
        if item == 2:
            raise ValueError("batch 2 is bad")
        return item
    with pytest.raises(ValueError, match="batch 2 is bad"):
        side_by_side(fails, range(4), workers=2)
    assert torch.get_num_threads() == threads


def test_one_batch_or_another_device_runs_in_the_callers_thread():
    caller = threading.get_ident()
    where = lambda _: threading.get_ident()
    assert side_by_side(where, [0], workers=2) == [caller]
    assert side_by_side(where, range(3), device="meta", workers=2) == [caller] * 3
    assert side_by_side(where, range(3), workers=1) == [caller] * 3
    assert caller not in side_by_side(where, range(3), workers=2)


def test_one_batch_per_torch_thread_on_the_cpu_one_elsewhere():
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert batches_at_once("cpu") == 3 and batches_at_once(torch.device("meta")) == 1
    finally:
        torch.set_num_threads(threads)
