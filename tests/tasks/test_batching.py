"""Evaluation batching: longest first, capped by rows and by padded tokens."""

import numpy as np

from lmlab.tasks.batching import length_sorted_batches, pad_rows


def test_length_sorted_batches_by_rows():
    batches = length_sorted_batches([3, 9, 1, 9, 5], 2)
    assert [b.tolist() for b in batches] == [[1, 3], [4, 0], [2]]  # stable among equal lengths


def test_length_sorted_batches_capped_by_padded_tokens():
    lengths = [300, 10, 100, 50, 50, 50, 40, 10]
    batches = length_sorted_batches(lengths, 4, max_tokens=200)
    # 300 > 200 goes alone; then 2 rows of ≤ 100; 4 rows of 50 (the row cap); then the rest
    assert [b.tolist() for b in batches] == [[0], [2, 3], [4, 5, 6, 1], [7]]
    for b in batches[1:]:
        assert len(b) * max(lengths[i] for i in b) <= 200
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))


def test_pad_rows_right_pads_to_the_longest():
    out = pad_rows([np.array([1, 2, 3]), np.array([4])], pad=0)
    assert out.tolist() == [[1, 2, 3], [4, 0, 0]]
