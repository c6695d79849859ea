"""T5 span corruption: `t5_lengths` against T5's helper loop, the noise mask's counts, spans and uniformity, the
corrupt/restore round trip and exact lengths, bad input."""

import itertools

import numpy as np
import pytest

from engine.objectives.span_corruption import random_spans_noise_mask, restore_spans, span_corrupt, t5_lengths

DENSITIES = (0.1, 0.15, 0.3, 0.5)
SPAN_LENGTHS = (2.0, 3.0, 5.0, 8.0)
SENTINELS = list(range(32000, 32100))  # 100 ids above every token the tests draw, as T5's extra ids
MANY_SENTINELS = list(range(32000, 33000))  # long windows at high density have hundreds of spans
EOS = 1


def reference_lengths(inputs_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """T5's `random_spans_helper` (one sentinel per span in inputs and targets), written out as its loop."""

    def lengths(tokens_length):
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        return num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs, targets = lengths(tokens_length)
    if noise_density == 0.5 and targets > inputs:
        tokens_length -= 1
        targets -= 1
    return tokens_length, targets


def runs(mask: np.ndarray) -> list[tuple[bool, int]]:
    """(value, length) of each maximal run of equal values."""
    return [(bool(v), len(list(g))) for v, g in itertools.groupby(mask.tolist())]


def test_t5_lengths_known_value():
    assert t5_lengths(512) == (568, 114)
    assert t5_lengths(512, 0.15, 3.0) == reference_lengths(512, 0.15, 3.0)


@pytest.mark.parametrize("noise_density", DENSITIES)
def test_t5_lengths_equal_t5_helper(noise_density):
    # Every inputs_length at the defaults (0.15, 3); every 4th (and the powers of two) for the other settings.
    for span in SPAN_LENGTHS:
        step = 1 if (noise_density, span) == (0.15, 3.0) else 4
        for inputs_length in sorted({*range(64, 2049, step), 128, 256, 512, 1024, 2048}):
            got = t5_lengths(inputs_length, noise_density, span)
            assert got == reference_lengths(inputs_length, noise_density, span), (inputs_length, noise_density, span)


def test_noise_mask_counts_and_alternation():
    rng = np.random.default_rng(0)
    for _ in range(400):
        length = int(rng.integers(2, 2000))
        density, span = float(rng.uniform(0.01, 0.99)), float(rng.uniform(1.0, 10.0))
        mask = random_spans_noise_mask(length, density, span, np.random.default_rng(int(rng.integers(1 << 31))))
        num_noise = min(max(round(length * density), 1), length - 1)
        num_spans = min(max(round(num_noise / span), 1), length - num_noise)
        assert mask.dtype == np.bool_ and mask.shape == (length,)
        assert int(mask.sum()) == num_noise, (length, density, span)
        r = runs(mask)
        assert [v for v, _ in r] == [False, True] * num_spans, (length, density, span)  # non-noise first, alternating


def test_noise_mask_deterministic_per_seed():
    for seed in range(5):
        a = random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(seed))
        b = random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(seed))
        np.testing.assert_array_equal(a, b)
    masks = {random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(s)).tobytes() for s in range(20)}
    assert len(masks) == 20


@pytest.mark.parametrize("length,density,span", [(12, 0.34, 2.0), (14, 0.25, 1.5), (15, 0.2, 1.5)])
def test_noise_mask_uniform_and_rates(length, density, span, seed=1234):
    """Every admissible mask (the right noise count, non-noise first, alternating, as many noise as non-noise spans)
    is equally likely: the chi-square of the masks' counts is within 3 sigma of its mean, and each position's noise
    rate within 3 sigma of its exact value from enumerating the admissible masks. Fixed seed."""
    num_noise = round(length * density)
    num_spans = max(round(num_noise / span), 1)
    admissible = []
    for noise_pos in itertools.combinations(range(length), num_noise):
        mask = np.zeros(length, bool)
        mask[list(noise_pos)] = True
        if [v for v, _ in runs(mask)] == [False, True] * num_spans:
            admissible.append(mask.tobytes())
    index = {m: i for i, m in enumerate(admissible)}
    n = 150 * len(admissible)
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(admissible))
    noise_at = np.zeros(length)
    for _ in range(n):
        mask = random_spans_noise_mask(length, density, span, rng)
        counts[index[mask.tobytes()]] += 1  # KeyError if the mask is not admissible
        noise_at += mask
    # Pearson's chi-square over the masks: mean df and standard deviation sqrt(2 df) under uniformity.
    expected, df = n / len(admissible), len(admissible) - 1
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert abs(chi2 - df) <= 3 * np.sqrt(2 * df), (chi2, df)
    exact = np.mean([np.frombuffer(m, dtype=bool) for m in admissible], axis=0)
    sigma = np.sqrt(exact * (1 - exact) / n)
    assert np.all(np.abs(noise_at / n - exact) <= 3 * sigma + 1e-12), (noise_at / n, exact)
    assert noise_at.sum() / n == num_noise  # the overall masked rate is exact


def test_round_trip_random():
    rng = np.random.default_rng(7)
    for i in range(200):
        length = int(rng.integers(2, 1200))
        density, span = float(rng.uniform(0.02, 0.98)), float(rng.uniform(1.0, 12.0))
        tokens = rng.integers(0, 32000, size=length).astype(np.int32)
        mask = random_spans_noise_mask(length, density, span, rng)
        if i % 3 == 0:
            mask = rng.random(length) < density  # any mask: may start with noise, end with non-noise, have no spans
        spans = sum(v for v, _ in runs(mask))
        sentinels = SENTINELS + list(range(40000, 40000 + length))  # enough for arbitrary masks
        eos = EOS if i % 2 else None
        inputs, targets = span_corrupt(tokens, mask, sentinels, eos)
        assert inputs.dtype == targets.dtype == np.int64
        extra = int(eos is not None)
        assert len(inputs) == int((~mask).sum()) + spans + extra and len(targets) == int(mask.sum()) + spans + extra
        np.testing.assert_array_equal(inputs[np.isin(inputs, sentinels)], sentinels[:spans])  # in order
        np.testing.assert_array_equal(restore_spans(inputs, targets, sentinels, eos), tokens)


def test_example():
    tokens = np.array([10, 11, 12, 13, 14, 15, 16, 17])
    mask = np.array([0, 0, 1, 1, 0, 0, 1, 1], bool)
    inputs, targets = span_corrupt(tokens, mask, [100, 99, 98], EOS)
    assert inputs.tolist() == [10, 11, 100, 14, 15, 99, EOS]
    assert targets.tolist() == [100, 12, 13, 99, 16, 17, EOS]


@pytest.mark.parametrize("noise_density", DENSITIES)
def test_lengths_from_t5_lengths_are_exact(noise_density):
    rng = np.random.default_rng(3)
    for span in SPAN_LENGTHS:
        for inputs_length in [64, 65, 100, 512, 1000, 2048, *rng.integers(64, 2049, size=20).tolist()]:
            raw, targets_length = t5_lengths(inputs_length, noise_density, span)
            tokens = rng.integers(0, 32000, size=raw)
            mask = random_spans_noise_mask(raw, noise_density, span, rng)
            inputs, targets = span_corrupt(tokens, mask, MANY_SENTINELS, EOS)
            got = (len(inputs), len(targets))
            if noise_density == 0.5:  # T5's adjustment at density 0.5 can leave both one short (T5 pads)
                assert got in {(inputs_length, targets_length), (inputs_length - 1, targets_length - 1)}, got
            else:
                assert got == (inputs_length, targets_length), (inputs_length, noise_density, span, got)
            np.testing.assert_array_equal(restore_spans(inputs, targets, MANY_SENTINELS, EOS), tokens)


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: t5_lengths(512, 0.0), "noise_density must be in"),
        (lambda: t5_lengths(512, 1.0), "noise_density must be in"),
        (lambda: t5_lengths(512, -0.1), "noise_density must be in"),
        (lambda: t5_lengths(512, 0.15, 0.5), "mean_noise_span_length must be >= 1"),
        (lambda: t5_lengths(2), "inputs_length must be >= 3"),
        (lambda: t5_lengths(6, 0.1, 8.0), "too short"),
        (lambda: random_spans_noise_mask(1, 0.15, 3.0, np.random.default_rng(0)), "length must be >= 2"),
        (lambda: random_spans_noise_mask(100, 1.5, 3.0, np.random.default_rng(0)), "noise_density must be in"),
        (lambda: random_spans_noise_mask(100, 0.15, 0.0, np.random.default_rng(0)), "mean_noise_span_length"),
        (lambda: span_corrupt(np.arange(6), np.array([0, 1, 0, 1, 0, 1], bool), [90, 91], EOS), "3 noise spans but"),
        (lambda: span_corrupt(np.arange(6), np.ones(5, bool), [90], EOS), "same shape"),
        (lambda: span_corrupt(np.arange(6), np.ones(6, int), [90], EOS), "bool mask"),
        (lambda: span_corrupt(np.array([1, 90, 2]), np.array([0, 1, 0], bool), [90], EOS), "contain sentinel"),
        (lambda: restore_spans(np.array([5, 90]), np.array([90, 6]), [90], EOS), "must both end with eos_id"),
        (lambda: restore_spans(np.array([5, 90]), np.array([6, 90, 7]), [90], None), "start with a sentinel"),
        (lambda: restore_spans(np.array([5, 91]), np.array([90, 6]), [90, 91], None), "missing from the targets"),
        (lambda: restore_spans(np.array([5]), np.array([90, 6]), [90, 91], None), "missing from the inputs"),
    ],
)
def test_bad_input_one_line(call, match):
    with pytest.raises(ValueError, match=match) as exc_info:
        call()
    _one_line(exc_info)
