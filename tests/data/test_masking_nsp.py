"""Next-sentence-prediction pairs: ≈50% balance, a real B is the continuation of A, a random B is
never from A's document, lengths do not give the label away; packing [CLS] A [SEP] B [SEP]."""

from __future__ import annotations

import numpy as np
import pytest

from lmlab.data.segments import IS_NEXT, IS_RANDOM, Documents, mlm_window, nsp_pair, pack
from lmlab.errors import DataError


def corpus(lengths: list[int]) -> Documents:
    """Token value = 1000 * document + position, so every token says where it came from."""
    tokens = np.concatenate([1000 * d + np.arange(n) for d, n in enumerate(lengths)])
    return Documents(tokens, np.cumsum(lengths))


def doc_of(segment: np.ndarray) -> set[int]:
    return set((segment // 1000).tolist())


@pytest.mark.parametrize("lengths", [[300, 50, 7, 120, 999, 2, 64] * 3, [5, 3, 8, 2, 6]])
def test_pairs_balance_and_provenance(lengths) -> None:
    docs, budget = corpus(lengths), 61
    labels, totals = [], {IS_NEXT: [], IS_RANDOM: []}
    for seed in range(3000):
        a, b, label = nsp_pair(docs, np.random.default_rng(seed), budget)
        assert 1 <= len(a) and 1 <= len(b) and len(a) + len(b) <= budget
        assert len(doc_of(a)) == 1 and len(doc_of(b)) == 1  # a segment never spans documents
        assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all()  # contiguous text
        if label == IS_NEXT:
            assert doc_of(a) == doc_of(b) and b[0] == a[-1] + 1  # B continues A
        else:
            assert doc_of(a) != doc_of(b)  # from ANOTHER document
        labels.append(label)
        totals[label].append(len(a) + len(b))
    assert abs(np.mean(labels) - 0.5) < 0.03
    # The random B has the real B's length (as far as its document allows): the sequence length
    # carries (almost) no information about the label.
    assert abs(np.mean(totals[IS_NEXT]) - np.mean(totals[IS_RANDOM])) < 0.05 * budget


def test_pairs_are_deterministic_given_the_generator() -> None:
    docs = corpus([40, 30, 50])
    first = [nsp_pair(docs, np.random.default_rng([3, s]), 20) for s in range(20)]
    again = [nsp_pair(docs, np.random.default_rng([3, s]), 20) for s in range(20)]
    assert all((x[0] == y[0]).all() and (x[1] == y[1]).all() and x[2] == y[2]
               for x, y in zip(first, again))


def test_one_document_is_an_error_and_a_one_token_document_is_never_next() -> None:
    single = corpus([100])
    with pytest.raises(DataError, match="at least 2 non-empty documents"):
        for seed in range(50):
            nsp_pair(single, np.random.default_rng(seed), 20)
    docs = corpus([1, 1, 1, 1])
    assert {nsp_pair(docs, np.random.default_rng(s), 20)[2] for s in range(30)} == {IS_RANDOM}
    with pytest.raises(DataError, match="document index ends at 5 but the split has 6 tokens"):
        Documents(np.arange(6), np.array([2, 5]))


def test_pack_types_and_padding() -> None:
    ids, types, mask = pack(np.array([7, 8]), np.array([9]), cls_id=2, sep_id=3, pad_id=0,
                            length=8)
    assert ids.tolist() == [2, 7, 8, 3, 9, 3, 0, 0]
    assert types.tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert mask.tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    ids, types, mask = pack(np.array([7, 8, 9]), None, cls_id=2, sep_id=3, pad_id=0, length=5)
    assert ids.tolist() == [2, 7, 8, 9, 3] and types.tolist() == [0] * 5 and mask.all()
    with pytest.raises(DataError, match="exceeds block_size"):
        pack(np.arange(5), None, cls_id=2, sep_id=3, pad_id=0, length=6)


def test_mlm_window() -> None:
    tokens = np.arange(50)
    windows = [mlm_window(tokens, np.random.default_rng(s), 10) for s in range(200)]
    assert all(len(w) == 10 and (np.diff(w) == 1).all() for w in windows)
    assert {int(w[0]) for w in windows} == set(range(41))  # every start, the last included
    with pytest.raises(DataError, match="fewer than one window"):
        mlm_window(tokens, np.random.default_rng(0), 51)
