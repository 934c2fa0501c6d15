"""BERT masking statistics over many draws: 15% targets, 80/10/10, special tokens and padding never
touched, whole words together, determinism given the generator's seed."""

from __future__ import annotations

import numpy as np
import pytest

from lmlab.data.masking import IGNORE_INDEX, MaskingSpec, mask_sequence
from lmlab.errors import ConfigError
from lmlab.tokenizer import Tokenizer

VOCAB = 1000
PAD, UNK, CLS, SEP, MASK = range(5)
CONTINUATION = 600  # ids >= 600 play "##" pieces


def spec(*, whole_word: bool = False, mask_prob: float = 0.15) -> MaskingSpec:
    special = np.zeros(VOCAB, dtype=bool)
    special[:5] = True
    continuation = np.arange(VOCAB) >= CONTINUATION if whole_word else None
    return MaskingSpec(mask_token_id=MASK, special=special, continuation=continuation,
                       mask_prob=mask_prob)


def sequences(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """[CLS] A [SEP] B [SEP] [PAD]… with random lengths; words are a head (5..599) followed by
    0-3 continuation pieces."""
    out = []
    for _ in range(n):
        pieces = []
        for _ in range(int(rng.integers(10, 40))):
            pieces.append(int(rng.integers(5, CONTINUATION)))
            pieces.extend(rng.integers(CONTINUATION, VOCAB, int(rng.integers(0, 4))).tolist())
        cut = int(rng.integers(1, len(pieces)))
        row = [CLS, *pieces[:cut], SEP, *pieces[cut:], SEP]
        out.append(np.array(row + [PAD] * int(rng.integers(0, 20)), dtype=np.int64))
    return out


@pytest.fixture(scope="module")
def rows() -> list[np.ndarray]:
    return sequences(3000, np.random.default_rng(0))


def draw(rows, masking: MaskingSpec, seed: int = 1):
    rng = np.random.default_rng(seed)
    return [mask_sequence(row, rng, masking) for row in rows]


def test_rates_over_many_draws(rows) -> None:
    masking = spec()
    targets = candidates = to_mask = to_random = kept = 0
    for row, (inputs, labels) in zip(rows, draw(rows, masking)):
        chosen = labels != IGNORE_INDEX
        n_candidates = int((row >= 5).sum())
        # Exactly round(15%) of each sequence's candidates, never fewer than one.
        assert chosen.sum() == max(1, round(0.15 * n_candidates))
        assert (labels[chosen] == row[chosen]).all()
        assert (inputs[~chosen] == row[~chosen]).all()  # only targets are corrupted
        targets += int(chosen.sum())
        candidates += n_candidates
        to_mask += int((inputs[chosen] == MASK).sum())
        kept += int((inputs[chosen] == row[chosen]).sum())
        to_random += int(((inputs[chosen] != MASK) & (inputs[chosen] != row[chosen])).sum())
    assert targets > 25_000
    assert abs(targets / candidates - 0.15) < 0.002
    assert abs(to_mask / targets - 0.8) < 0.01
    # A random replacement equals the original 1 time in 995; those count as kept.
    assert abs(to_random / targets - 0.1 * (1 - 1 / 995)) < 0.008
    assert abs(kept / targets - 0.1) < 0.008


def test_special_tokens_and_padding_are_never_targets_nor_replacements(rows) -> None:
    for row, (inputs, labels) in zip(rows, draw(rows, spec())):
        special = row < 5
        assert (labels[special] == IGNORE_INDEX).all()
        assert (inputs[special] == row[special]).all()
        replaced = (inputs != row) & (inputs != MASK)
        assert (inputs[replaced] >= 5).all()  # random tokens are never [CLS]/[SEP]/[PAD]/…


def test_whole_words_are_masked_together(rows) -> None:
    targets = candidates = 0
    for row, (_, labels) in zip(rows, draw(rows, spec(whole_word=True))):
        chosen = labels != IGNORE_INDEX
        for i in range(1, len(row)):
            if row[i] >= CONTINUATION and row[i - 1] >= 5:  # a "##" piece inside a word
                assert chosen[i] == chosen[i - 1]
        targets += int(chosen.sum())
        candidates += int((row >= 5).sum())
        assert chosen.sum() >= 1
    # Whole words in random order until the next would overflow k: slightly under 15%.
    assert 0.13 < targets / candidates <= 0.151


def test_a_continuation_piece_after_a_special_token_is_its_own_word() -> None:
    row = np.array([CLS, 700, 701, SEP, 702, 10, SEP])  # B starts with a cut-off "##" piece
    seen = set()
    for seed in range(200):
        _, labels = mask_sequence(row, np.random.default_rng(seed), spec(whole_word=True,
                                                                         mask_prob=0.2))
        seen.add(tuple(np.flatnonzero(labels != IGNORE_INDEX)))
    # k = 1: a one-token word alone; the first word (700 701) has 2 pieces, still taken whole.
    assert seen == {(1, 2), (4,), (5,)}


def test_deterministic_given_the_generator_seed(rows) -> None:
    first, again, other = draw(rows[:50], spec(), 7), draw(rows[:50], spec(), 7), \
        draw(rows[:50], spec(), 8)
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(first, again))
    assert any((a[1] != b[1]).any() for a, b in zip(first, other))


def test_short_and_empty_sequences() -> None:
    inputs, labels = mask_sequence(np.array([CLS, 42, SEP]), np.random.default_rng(0), spec())
    assert labels.tolist() == [IGNORE_INDEX, 42, IGNORE_INDEX]  # one target however short
    inputs, labels = mask_sequence(np.array([CLS, SEP, PAD]), np.random.default_rng(0), spec())
    assert inputs.tolist() == [CLS, SEP, PAD] and (labels == IGNORE_INDEX).all()


def test_spec_validation() -> None:
    with pytest.raises(ConfigError, match="mask_prob"):
        spec(mask_prob=0.0)
    special = np.zeros(VOCAB, dtype=bool)
    with pytest.raises(ConfigError, match="not a special token"):
        MaskingSpec(mask_token_id=MASK, special=special, continuation=None)
    bpe = Tokenizer.train_bpe(iterator=["some text"] * 5, vocab_size=300)
    with pytest.raises(ConfigError, match="needs a tokenizer with a mask token"):
        MaskingSpec.from_tokenizer(bpe)


def test_spec_from_a_wordpiece_tokenizer() -> None:
    tok = Tokenizer.train_wordpiece(iterator=["the quick brown foxes jump"] * 20, vocab_size=60)
    masking = MaskingSpec.from_tokenizer(tok, whole_word=True)
    assert masking.mask_token_id == tok.mask_token_id
    assert masking.special[[tok.pad_token_id, tok.cls_token_id, tok.sep_token_id,
                            tok.unk_token_id, tok.mask_token_id]].all()
    pieces = [i for i in range(tok.vocab_size) if tok.id_to_token(i).startswith("##")]
    assert pieces and masking.continuation[pieces].all()
    assert masking.continuation.sum() == len(pieces)
    assert not np.isin(masking.random_ids, list(tok.special_token_ids)).any()
