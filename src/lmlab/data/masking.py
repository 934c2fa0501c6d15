"""BERT's masked-LM corruption of one token sequence.

As in the original `create_pretraining_data.py`, each sequence gets exactly
`k = max(1, round(mask_prob × candidates))` prediction targets (not a Bernoulli draw per token,
which would leave some sequences with none), chosen among its non-special tokens — [CLS], [SEP],
[PAD] and every other special token are never targets. Of the targets, 80% become [MASK], 10% a
random token, 10% stay unchanged (decided per token). The random token is drawn from the
non-special vocabulary: a stray [SEP] or [PAD] in the middle of a text would teach the model
nothing. With whole-word masking a word — a WordPiece head and the "##" pieces after it — is
chosen or left as a whole: words are taken in random order while the total stays within k.

Everything random comes from the `numpy.random.Generator` passed in, so the caller decides what
a masking is a function of: (seed, step, row) in training, a fixed seed for validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lmlab.errors import ConfigError

IGNORE_INDEX = -100  # label of a position that is not a prediction target (as in PyTorch / HF)


@dataclass(frozen=True)
class MaskingSpec:
    mask_token_id: int
    special: np.ndarray  # (vocab,) bool: never masked, never a random replacement
    continuation: np.ndarray | None  # (vocab,) bool: "##" pieces; None = mask tokens, not words
    mask_prob: float = 0.15
    mask_replace_prob: float = 0.8  # of the targets: → [MASK]
    random_replace_prob: float = 0.1  # of the targets: → a random token; the rest stay
    random_ids: np.ndarray = field(init=False, repr=False)  # what a random replacement is

    def __post_init__(self):
        if not 0 < self.mask_prob < 1:
            raise ConfigError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if not (0 <= self.mask_replace_prob and 0 <= self.random_replace_prob
                and self.mask_replace_prob + self.random_replace_prob <= 1):
            raise ConfigError("mask_replace_prob and random_replace_prob must be >= 0 with a sum"
                              f" <= 1, got {self.mask_replace_prob}, {self.random_replace_prob}")
        if not self.special[self.mask_token_id]:
            raise ConfigError(f"mask token id {self.mask_token_id} is not a special token")
        object.__setattr__(self, "random_ids", np.flatnonzero(~self.special))

    @classmethod
    def from_tokenizer(cls, tokenizer, *, mask_prob: float = 0.15,
                       whole_word: bool = False) -> MaskingSpec:
        """The spec for a tokenizer with a mask token; whole-word masking needs WordPiece."""
        if tokenizer.mask_token_id is None:
            raise ConfigError(f"masked LM needs a tokenizer with a mask token; this {tokenizer.kind}"
                              " tokenizer has none (use tokenizer: wordpiece or a BERT directory)")
        special = np.zeros(tokenizer.vocab_size, dtype=bool)
        special[list(tokenizer.special_token_ids)] = True
        continuation = None
        if whole_word:
            if tokenizer.kind != "wordpiece":
                raise ConfigError("whole_word_mask needs a WordPiece tokenizer (words are a head"
                                  f" and its '##' pieces), got a {tokenizer.kind} tokenizer")
            continuation = np.array([(tokenizer.id_to_token(i) or "").startswith("##")
                                     for i in range(tokenizer.vocab_size)], dtype=bool)
        return cls(mask_token_id=tokenizer.mask_token_id, special=special,
                   continuation=continuation, mask_prob=mask_prob)


def mask_sequence(ids: np.ndarray, rng: np.random.Generator,
                  spec: MaskingSpec) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) for one sequence of token ids (T,): labels hold the original id at
    the prediction targets and IGNORE_INDEX elsewhere."""
    ids = np.asarray(ids, dtype=np.int64)
    inputs, labels = ids.copy(), np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    candidates = np.flatnonzero(~spec.special[ids])
    if len(candidates) == 0:
        return inputs, labels
    k = max(1, round(len(candidates) * spec.mask_prob))
    if spec.continuation is None:
        chosen = rng.permutation(candidates)[:k]
    else:
        chosen = _whole_words(ids, candidates, k, rng, spec.continuation)
    chosen.sort()
    labels[chosen] = ids[chosen]
    draw = rng.random(len(chosen))
    to_mask = chosen[draw < spec.mask_replace_prob]
    to_random = chosen[(draw >= spec.mask_replace_prob)
                       & (draw < spec.mask_replace_prob + spec.random_replace_prob)]
    inputs[to_mask] = spec.mask_token_id
    inputs[to_random] = spec.random_ids[rng.integers(0, len(spec.random_ids), len(to_random))]
    return inputs, labels


def _whole_words(ids: np.ndarray, candidates: np.ndarray, k: int, rng: np.random.Generator,
                 continuation: np.ndarray) -> np.ndarray:
    """Positions of whole words, in random word order, as many as fit in k tokens (at least one
    word, however long)."""
    # A word starts at a piece that is not "##…", or right after a special token (a segment may
    # begin with a continuation piece cut from its word).
    starts = ~continuation[ids[candidates]] | (np.diff(candidates, prepend=-2) != 1)
    word = np.cumsum(starts) - 1  # word index of every candidate
    sizes = np.bincount(word)
    order = rng.permutation(len(sizes))
    fitting = int(np.searchsorted(np.cumsum(sizes[order]), k, side="right"))
    taken = np.zeros(len(sizes), dtype=bool)
    taken[order[:max(1, fitting)]] = True
    return candidates[taken[word]]
