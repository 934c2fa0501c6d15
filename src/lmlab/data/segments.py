"""Encoder pretraining examples cut from a prepared token stream: masked-LM windows and
next-sentence-prediction segment pairs, packed as `[CLS] A [SEP] B [SEP]`.

NSP follows BERT (Devlin et al., 2019, §3.1 and `create_pretraining_data.py`) on token segments
rather than sentence lists, since a prepared dataset keeps documents (its document index) but not
sentences: a chunk of up to `budget` tokens is taken from a document, split at a random point
into A and B; half the time B is replaced by a segment of the same length from a random position
in ANOTHER document. Giving the random B the length of the real one keeps the sequence length
from telling the two apart (BERT fills a random B to the full length, so short documents leak
the label). The pair is sized to fit, so it never needs truncation.

Each function draws only from the generator it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmlab.errors import DataError

IS_NEXT, IS_RANDOM = 0, 1  # the HF / original BERT labels of next_sentence_label


@dataclass(frozen=True)
class Documents:
    """A split's token stream and where its documents end (exclusive offsets)."""

    tokens: np.ndarray
    ends: np.ndarray

    def __post_init__(self):
        if len(self.ends) == 0 or int(self.ends[-1]) != len(self.tokens):
            raise DataError(f"document index ends at {int(self.ends[-1]) if len(self.ends) else 0}"
                            f" but the split has {len(self.tokens)} tokens; prepare it again")

    @property
    def largest(self) -> int:
        return int(np.max(np.diff(self.ends, prepend=0)))

    def bounds(self, position: int) -> tuple[int, int]:
        """(start, end) of the document holding token `position`."""
        d = int(np.searchsorted(self.ends, position, side="right"))
        return (0 if d == 0 else int(self.ends[d - 1])), int(self.ends[d])


def mlm_window(tokens: np.ndarray, rng: np.random.Generator, length: int) -> np.ndarray:
    """A random window of `length` consecutive tokens (it may span documents, as RoBERTa's
    FULL-SENTENCES input does)."""
    if len(tokens) < length:
        raise DataError(f"split has {len(tokens)} tokens, fewer than one window of {length};"
                        " use more data or a smaller block_size")
    start = int(rng.integers(0, len(tokens) - length + 1))
    return np.asarray(tokens[start:start + length], dtype=np.int64)


def nsp_pair(docs: Documents, rng: np.random.Generator,
             budget: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(A, B, label): `len(A) + len(B) <= budget`, both non-empty; label IS_NEXT or IS_RANDOM,
    each with probability 1/2 (a one-token document has no next segment: always IS_RANDOM)."""
    tokens, total = docs.tokens, len(docs.tokens)
    # A position uniform over tokens picks documents in proportion to their length.
    position = int(rng.integers(0, total))
    start, end = docs.bounds(position)
    label = IS_RANDOM if rng.random() < 0.5 else IS_NEXT
    first = min(position, max(start, end - budget))  # a full chunk when the document allows
    length = min(budget, end - first)
    if length < 2:
        label = IS_RANDOM
    a_len = int(rng.integers(1, length)) if length >= 2 else 1
    a = np.asarray(tokens[first:first + a_len], dtype=np.int64)
    b_len = max(1, length - a_len)
    if label == IS_NEXT:
        return a, np.asarray(tokens[first + a_len:first + length], dtype=np.int64), label
    # Uniform over the tokens of every other document: skip this document's range.
    other = total - (end - start)
    if other <= 0:
        raise DataError("next-sentence prediction needs at least 2 non-empty documents")
    q = int(rng.integers(0, other))
    q += (end - start) if q >= start else 0
    start2, end2 = docs.bounds(q)
    first2 = min(q, max(start2, end2 - b_len))
    return a, np.asarray(tokens[first2:min(first2 + b_len, end2)], dtype=np.int64), label


def pack(a: np.ndarray, b: np.ndarray | None, *, cls_id: int, sep_id: int, pad_id: int,
         length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, token_type_ids, attention_mask), each (length,): `[CLS] A [SEP] (B [SEP])`
    then padding; token type 1 for B and its [SEP], as BERT."""
    parts = [[cls_id], a, [sep_id]] + ([] if b is None else [b, [sep_id]])
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
    used = len(ids)
    if used > length:
        raise DataError(f"packed sequence of {used} tokens exceeds block_size {length}")
    types = np.zeros(length, dtype=np.int64)
    if b is not None:
        types[len(a) + 2:used] = 1
    mask = np.zeros(length, dtype=np.int64)
    mask[:used] = 1
    return np.concatenate([ids, np.full(length - used, pad_id, dtype=np.int64)]), types, mask
