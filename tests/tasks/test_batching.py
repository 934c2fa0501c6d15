"""Evaluation batching: longest first, capped by rows; right padding."""

import numpy as np

from lmlab.tasks.batching import length_sorted_batches, pad_rows


def test_length_sorted_batches_by_rows():
    batches = length_sorted_batches([3, 9, 1, 9, 5], 2)
    assert [b.tolist() for b in batches] == [[1, 3], [4, 0], [2]]  # stable among equal lengths


def test_pad_rows_right_pads_to_the_longest():
    out = pad_rows([np.array([1, 2, 3]), np.array([4])], pad=0)
    assert out.tolist() == [[1, 2, 3], [4, 0, 0]]
