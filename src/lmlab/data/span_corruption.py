"""T5's span corruption: the noise mask, the sentinel encoding of inputs and targets, its inverse,
and the raw length whose corrupted input fills a given encoder length.

A raw sequence of `length` tokens is corrupted as T5 does (`random_spans_noise_mask` and
`random_spans_helper` in t5/data/preprocessors.py): `num_noise_tokens = round(length *
noise_density)` clipped to [1, length - 1], `num_noise_spans = round(num_noise_tokens /
mean_noise_span_length)`, at least 1; the noise tokens and the other tokens are each cut into
`num_noise_spans` non-empty spans uniformly at random, and the spans alternate, non-noise first
(so the mask always ends with noise). Each noise span becomes one sentinel in the input
(`<extra_id_0>` for the first, `<extra_id_1>` for the next, …); the target is each sentinel
followed by the span it hides; both end with EOS:

    tokens   A B C D E F G H        mask  . . X X . . . X
    inputs   A B <0> E F G <1> </s>
    targets  <0> C D <1> H </s>

The counts are computed as T5's TensorFlow code computes them — in float32, rounding halves to
even (`tf.round`) — which decides ties such as 190 × 0.15: 28.5 in float64 (→ 28, what the numpy
port in transformers' run_t5_mlm_flax.py gives) but 28.500002 in float32 (→ 29, T5's mask).
T5's `random_spans_helper` rounds in float64, so at some lengths (inputs_length 172, 316, …) the
target length it reports is 2 short of what its own mask produces; here one function computes
the counts for both, so the lengths always hold. The random draws come from a numpy Generator:
the same distribution as T5's stateless TensorFlow shuffles, not the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check_noise(noise_density: float, mean_noise_span_length: float) -> None:
    if not 0 < noise_density < 1:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if not mean_noise_span_length >= 1:
        raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}")


def noise_counts(length: int, noise_density: float,
                 mean_noise_span_length: float) -> tuple[int, int]:
    """(num_noise_tokens, num_noise_spans) of a sequence of `length` tokens, as T5's
    random_spans_noise_mask computes them (float32, round half to even; a length below 2 counts
    as 2, as T5 does). Where T5 would fail — more spans than non-noise tokens, at noise
    densities near 1 — the spans are capped at the non-noise tokens."""
    _check_noise(noise_density, mean_noise_span_length)
    length = max(int(length), 2)
    noise = int(np.rint(np.float32(length) * np.float32(noise_density)))
    noise = min(max(noise, 1), length - 1)
    spans = int(np.rint(np.float32(noise) / np.float32(mean_noise_span_length)))
    spans = max(spans, 1)
    return noise, min(spans, length - noise)


def _random_segmentation(num_items: int, num_segments: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Lengths of `num_segments` non-empty segments that add up to `num_items`, every such
    partition equally likely: T5 shuffles `num_segments - 1` segment starts among the
    `num_items - 1` places after the first item."""
    starts = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    segment_id = np.cumsum(np.concatenate([[False], starts]))
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, *, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0,
                            rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of `length` (True = noise) of T5's random spans (see the module doc)."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    padded = max(length, 2)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    other_lengths = _random_segmentation(padded - num_noise, num_spans, rng)
    interleaved = np.stack([other_lengths, noise_lengths], axis=1).reshape(-1)  # (2 * spans,)
    is_noise = np.tile(np.array([False, True]), num_spans)
    return np.repeat(is_noise, interleaved)[:length]


def corrupted_lengths(length: int, noise_density: float,
                      mean_noise_span_length: float) -> tuple[int, int]:
    """(inputs, targets) lengths, EOS included, of every corrupted sequence of `length` tokens:
    the non-noise tokens and a sentinel per span; the noise tokens and a sentinel per span."""
    noise, spans = noise_counts(length, noise_density, mean_noise_span_length)
    if length < 2:  # T5 counts as if 2 tokens, then keeps the first: no noise at all
        return length + 1, 1
    return length - noise + spans + 1, noise + spans + 1


def compute_input_and_target_lengths(inputs_length: int, noise_density: float,
                                     mean_noise_span_length: float) -> tuple[int, int]:
    """(raw tokens length, targets length): the longest raw sequence whose corrupted input,
    EOS included, is at most `inputs_length` — exactly `inputs_length` for noise densities below
    0.5 — and the length of its targets (T5's random_spans_helper; transformers'
    compute_input_and_target_lengths). At noise density 0.5 it keeps T5's step back by one
    token, so that the targets are not longer than the inputs."""
    _check_noise(noise_density, mean_noise_span_length)
    if inputs_length < 3:
        raise ValueError(f"inputs_length must be >= 3 (a token, a sentinel, EOS), got "
                         f"{inputs_length}")
    tokens_length = inputs_length - 1
    while corrupted_lengths(tokens_length + 1, noise_density,
                            mean_noise_span_length)[0] <= inputs_length:
        tokens_length += 1
    inputs, targets = corrupted_lengths(tokens_length, noise_density, mean_noise_span_length)
    if noise_density == 0.5 and targets > inputs:
        tokens_length -= 1
        targets = corrupted_lengths(tokens_length, noise_density, mean_noise_span_length)[1]
    return tokens_length, targets


def sentinel_encode(tokens: np.ndarray, noise_mask: np.ndarray, *, sentinel_ids: Sequence[int],
                    eos_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) as int64 arrays: each noise span replaced by the next sentinel of
    `sentinel_ids` (in order, `<extra_id_0>` first) in the inputs; each sentinel followed by its
    span in the targets; EOS at the end of both."""
    tokens = np.asarray(tokens, dtype=np.int64)
    mask = np.asarray(noise_mask, dtype=bool)
    if tokens.shape != mask.shape or tokens.ndim != 1:
        raise ValueError(f"tokens {tokens.shape} and noise_mask {mask.shape} must be 1-d and of "
                         "one shape")
    starts = mask & ~np.concatenate([[False], mask[:-1]])  # the first token of each noise span
    num_spans = int(starts.sum())
    if num_spans > len(sentinel_ids):
        raise ValueError(f"{num_spans} noise spans need as many sentinels, got "
                         f"{len(sentinel_ids)}")
    sentinels = np.asarray(sentinel_ids[:num_spans], dtype=np.int64)
    span_of = np.cumsum(starts) - 1  # the span index of every noise token
    inputs = np.where(starts, sentinels[np.maximum(span_of, 0)] if num_spans else 0, tokens)
    inputs = inputs[~mask | starts]
    # The span starts among the noise tokens: where each span's sentinel goes in the targets.
    targets = np.insert(tokens[mask], np.flatnonzero(starts[mask]), sentinels)
    eos = np.array([eos_token_id], dtype=np.int64)
    return np.concatenate([inputs, eos]), np.concatenate([targets, eos])


def sentinel_decode(inputs: Sequence[int], targets: Sequence[int], *,
                    sentinel_ids: Sequence[int], eos_token_id: int) -> np.ndarray:
    """The original tokens of `sentinel_encode`'s (inputs, targets): every sentinel of the
    inputs replaced by what follows it in the targets. Raises ValueError when they do not fit
    together (a missing EOS, a sentinel out of order or absent from the targets)."""
    inputs, targets = list(map(int, inputs)), list(map(int, targets))
    if not inputs or inputs[-1] != eos_token_id or not targets or targets[-1] != eos_token_id:
        raise ValueError("inputs and targets must each end with EOS")
    index = {int(s): k for k, s in enumerate(sentinel_ids)}
    spans: list[list[int]] = []
    for token in targets[:-1]:
        if token in index:
            if index[token] != len(spans):
                raise ValueError(f"targets: sentinel {token} out of order")
            spans.append([])
        elif not spans:
            raise ValueError("targets must start with a sentinel")
        else:
            spans[-1].append(token)
    out: list[int] = []
    seen = 0
    for token in inputs[:-1]:
        if token in index:
            if index[token] != seen or seen >= len(spans):
                raise ValueError(f"inputs: sentinel {token} out of order or not in the targets")
            out.extend(spans[seen])
            seen += 1
        else:
            out.append(token)
    if seen != len(spans):
        raise ValueError(f"targets hold {len(spans)} spans, the inputs {seen} sentinels")
    return np.array(out, dtype=np.int64)
