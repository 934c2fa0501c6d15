"""T5's span corruption: noise-token and span counts exactly as T5's random_spans_noise_mask
computes them (float32, round half to even) for every length 2..600 and several densities; masks
that start with non-noise and have exactly that many noise runs; sentinels in order; the inverse
recovers every token; rates over many rows; the raw length that fills inputs_length exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lmlab.data.span_corruption import (_random_segmentation, compute_input_and_target_lengths,
                                        corrupted_lengths, noise_counts, random_spans_noise_mask,
                                        sentinel_decode, sentinel_encode)

SENTINELS = list(range(999, 899, -1))  # <extra_id_0> = 999, <extra_id_1> = 998, … as T5's ids
EOS = 1


def t5_counts(length: int, density: float, mean: float) -> tuple[int, int]:
    """T5's arithmetic, written out as its TensorFlow code does it: tf.cast to float32, tf.round
    (half to even), clip noise to [1, length - 1], at least one span. Where that gives more
    spans than non-noise tokens T5 fails (its two segmentations differ in length); lmlab caps
    the spans there — at density 0.5 and mean 1, odd lengths."""
    length = max(length, 2)
    noise = int(np.round(np.float32(length) * np.float32(density)))
    noise = min(max(noise, 1), length - 1)
    spans = max(int(np.round(np.float32(noise) / np.float32(mean))), 1)
    return noise, min(spans, length - noise)


def runs(mask: np.ndarray) -> list[tuple[bool, int]]:
    """(value, length) of each maximal run of equal values."""
    return [(bool(k), len(list(g))) for k, g in itertools.groupby(mask)]


@pytest.mark.parametrize("density", [0.05, 0.15, 0.3, 0.5])
@pytest.mark.parametrize("mean", [1.0, 3.0, 5.5])
def test_counts_equal_t5s_for_every_length(density, mean) -> None:
    rng = np.random.default_rng(0)
    for length in range(2, 601):
        noise, spans = t5_counts(length, density, mean)
        assert noise_counts(length, density, mean) == (noise, spans), length
        mask = random_spans_noise_mask(length, noise_density=density,
                                       mean_noise_span_length=mean, rng=rng)
        assert mask.shape == (length,) and mask.dtype == bool
        assert int(mask.sum()) == noise, length
        found = runs(mask)
        # non-noise first, then alternating: exactly `spans` noise runs (the last run is noise)
        assert [v for v, _ in found] == [False, True] * spans, length


def test_rounding_is_t5s_float32_half_to_even() -> None:
    # 190 × 0.15 is 28.5 in float64 (→ 28, numpy ports) but 28.500002 in float32: T5 masks 29.
    assert noise_counts(190, 0.15, 3.0) == (29, 10)
    assert round(190 * 0.15) == 28
    assert noise_counts(10, 0.25, 3.0) == (2, 1)  # 2.5 → 2 (half to even), 2/3 → 1
    assert noise_counts(2, 0.15, 3.0) == (1, 1)  # clipped up to one noise token
    assert noise_counts(1, 0.15, 3.0) == (1, 1)  # T5 counts a 1-token sequence as 2
    assert not random_spans_noise_mask(1, rng=np.random.default_rng(0)).any()


def test_segmentation_is_uniform_over_partitions() -> None:
    """5 items in 2 non-empty segments: (1,4), (2,3), (3,2), (4,1), each a quarter of draws."""
    rng = np.random.default_rng(1)
    draws = [tuple(_random_segmentation(5, 2, rng)) for _ in range(8000)]
    assert set(draws) == {(1, 4), (2, 3), (3, 2), (4, 1)}
    for partition in set(draws):
        assert abs(draws.count(partition) / len(draws) - 0.25) < 0.02
    assert all(sum(d) == 5 and min(d) >= 1 for d in draws)


def test_sentinel_encoding_of_an_example() -> None:
    tokens = np.array([10, 11, 12, 13, 14, 15, 16, 17])  # A B C D E F G H
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1], dtype=bool)
    inputs, targets = sentinel_encode(tokens, mask, sentinel_ids=SENTINELS, eos_token_id=EOS)
    assert inputs.tolist() == [10, 11, 999, 14, 15, 16, 998, EOS]
    assert targets.tolist() == [999, 12, 13, 998, 17, EOS]
    assert sentinel_decode(inputs, targets, sentinel_ids=SENTINELS,
                           eos_token_id=EOS).tolist() == tokens.tolist()


def test_every_token_is_recovered_and_sentinels_are_in_order() -> None:
    rng = np.random.default_rng(2)
    for _ in range(300):
        length = int(rng.integers(2, 400))
        density = float(rng.choice([0.1, 0.15, 0.3]))
        # tokens may repeat and include EOS (document ends in a packed stream)
        tokens = rng.integers(0, 50, size=length)
        mask = random_spans_noise_mask(length, noise_density=density, rng=rng)
        inputs, targets = sentinel_encode(tokens, mask, sentinel_ids=SENTINELS, eos_token_id=EOS)
        spans = noise_counts(length, density, 3.0)[1]
        assert [t for t in inputs if t >= 900] == SENTINELS[:spans]
        assert [t for t in targets if t >= 900] == SENTINELS[:spans]
        assert targets[0] == SENTINELS[0] and inputs[-1] == EOS and targets[-1] == EOS
        assert (len(inputs), len(targets)) == corrupted_lengths(length, density, 3.0)
        recovered = sentinel_decode(inputs, targets, sentinel_ids=SENTINELS, eos_token_id=EOS)
        assert recovered.tolist() == tokens.tolist()


def test_noise_rate_and_span_length_over_many_rows() -> None:
    rng = np.random.default_rng(3)
    length, rows = 141, 4000
    masks = np.stack([random_spans_noise_mask(length, rng=rng) for _ in range(rows)])
    assert abs(masks.mean() - 0.15) < 0.005
    spans = [n for m in masks for v, n in runs(m) if v]
    assert abs(np.mean(spans) - 3.0) < 0.05
    assert max(spans) >= 8 and min(spans) == 1  # the lengths vary, they are not all 3
    # Every position but the first is noise at times; away from the ends at about the density
    # (T5's mask always ends with a noise span: the last position is always noise).
    position_rate = masks.mean(axis=0)
    assert position_rate[0] == 0 and position_rate[-1] == 1
    assert np.all(np.abs(position_rate[5:-10] - 0.15) < 0.04)


def test_input_and_target_lengths() -> None:
    # T5's and transformers' figures: inputs 512 at 15% noise, mean span 3 → 568 raw tokens,
    # targets 114; inputs 128 → 141 raw, targets 29.
    assert compute_input_and_target_lengths(512, 0.15, 3.0) == (568, 114)
    assert compute_input_and_target_lengths(128, 0.15, 3.0) == (141, 29)
    rng = np.random.default_rng(4)
    for density, mean in [(0.15, 3.0), (0.1, 2.0), (0.3, 3.0), (0.05, 8.0)]:
        for inputs_length in range(3, 600, 7):
            raw, targets_length = compute_input_and_target_lengths(inputs_length, density, mean)
            # the longest raw length that fits, and its corruption fills inputs_length exactly
            assert corrupted_lengths(raw + 1, density, mean)[0] > inputs_length
            for _ in range(3):
                tokens = rng.integers(0, 50, size=raw)
                mask = random_spans_noise_mask(raw, noise_density=density,
                                               mean_noise_span_length=mean, rng=rng)
                inputs, targets = sentinel_encode(tokens, mask, sentinel_ids=SENTINELS,
                                                  eos_token_id=EOS)
                assert len(inputs) == inputs_length, (density, inputs_length)
                assert len(targets) == targets_length
    # Noise 0.5: T5 steps back a token so that the targets are not longer than the inputs.
    raw, targets_length = compute_input_and_target_lengths(128, 0.5, 3.0)
    assert targets_length <= corrupted_lengths(raw, 0.5, 3.0)[0] <= 128


def test_bad_arguments_say_what_is_wrong() -> None:
    rng = np.random.default_rng(0)
    for density in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="noise_density must be in"):
            random_spans_noise_mask(10, noise_density=density, rng=rng)
    with pytest.raises(ValueError, match="mean_noise_span_length must be >= 1"):
        noise_counts(10, 0.15, 0.5)
    with pytest.raises(ValueError, match="inputs_length must be >= 3"):
        compute_input_and_target_lengths(2, 0.15, 3.0)
    tokens, mask = np.arange(10), np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1], dtype=bool)
    with pytest.raises(ValueError, match="5 noise spans need as many sentinels, got 2"):
        sentinel_encode(tokens, mask, sentinel_ids=[999, 998], eos_token_id=EOS)
    inputs, targets = sentinel_encode(tokens, mask, sentinel_ids=SENTINELS, eos_token_id=EOS)
    with pytest.raises(ValueError, match="end with EOS"):
        sentinel_decode(inputs[:-1], targets, sentinel_ids=SENTINELS, eos_token_id=EOS)
    with pytest.raises(ValueError, match="sentinel 995 out of order or not in the targets"):
        sentinel_decode(inputs, targets[:-3].tolist() + [EOS], sentinel_ids=SENTINELS,
                        eos_token_id=EOS)
