"""Masked LM: exact selection counts, the 80/10/10 split within 3 sigma, special ids untouched, labels exactly at the
selected positions, random replacements uniform over non-special ids, both shapes, bad input."""

import math

import numpy as np
import pytest

from engine.objectives.mlm import IGNORE_INDEX, mask_tokens

VOCAB, MASK = 300, 258
SPECIALS = (256, 257, 258, 259, 299)


def batch(rng: np.random.Generator, shape=(400, 256)) -> np.ndarray:
    """Random ordinary tokens with about 10% special ids sprinkled in."""
    tokens = rng.integers(0, 256, size=shape)
    sprinkle = rng.random(shape) < 0.1
    tokens[sprinkle] = rng.choice(SPECIALS, size=int(sprinkle.sum()))
    return tokens.astype(np.int32)


def within_3_sigma(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) < 3 * math.sqrt(n * p * (1 - p))


def test_exact_count_per_row_and_labels_exactly_at_the_selected_positions():
    rng = np.random.default_rng(0)
    tokens = batch(rng)
    inputs, labels = mask_tokens(tokens, rng, MASK, VOCAB, SPECIALS)
    assert inputs.dtype == tokens.dtype and labels.dtype == np.int64 and inputs.shape == labels.shape == tokens.shape
    selected = labels != IGNORE_INDEX
    eligible = ~np.isin(tokens, SPECIALS)
    assert np.array_equal(selected.sum(axis=1), np.round(0.15 * eligible.sum(axis=1)))
    assert np.array_equal(labels[selected], tokens[selected])
    assert np.array_equal(inputs[~selected], tokens[~selected])  # nothing outside the selection changes
    assert not (selected & ~eligible).any()  # special ids are never selected


def test_selection_is_uniform_over_positions():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 256, size=(4000, 64))
    _, labels = mask_tokens(tokens, rng, MASK, VOCAB, SPECIALS, mask_rate=0.25)
    per_position = (labels != IGNORE_INDEX).sum(axis=0)
    assert per_position.sum() == 4000 * 16
    chi2 = ((per_position - 1000) ** 2 / 1000).sum()  # 1000 expected per position; df 63
    assert chi2 < 63 + 6 * math.sqrt(2 * 63), chi2


def test_80_10_10_split_within_3_sigma():
    rng = np.random.default_rng(2)
    tokens = batch(rng)
    inputs, labels = mask_tokens(tokens, rng, MASK, VOCAB, SPECIALS)
    selected = labels != IGNORE_INDEX
    n = int(selected.sum())
    got, orig = inputs[selected], tokens[selected]
    hit = 1 / (VOCAB - len(SPECIALS))  # a random replacement may draw the original token
    assert within_3_sigma(int((got == MASK).sum()), n, 0.8)
    assert within_3_sigma(int(((got != MASK) & (got != orig)).sum()), n, 0.1 * (1 - hit))
    assert within_3_sigma(int((got == orig).sum()), n, 0.1 + 0.1 * hit)


def test_random_replacements_are_uniform_over_non_special_ids():
    rng = np.random.default_rng(3)
    specials = (0, 3, 4, 5, 19)  # at both ends and in a run; the mask id 7 counts as special too
    ordinary = np.setdiff1d(np.arange(20), [*specials, 7])
    tokens = rng.choice(ordinary, size=(2000, 64))
    inputs, labels = mask_tokens(tokens, rng, 7, 20, specials, mask_rate=0.5, replace_rate=0.0, random_rate=1.0)
    drawn = inputs[labels != IGNORE_INDEX]
    assert np.isin(drawn, ordinary).all()
    counts = np.bincount(drawn, minlength=20)[ordinary]
    expected = len(drawn) / len(ordinary)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 13 + 6 * math.sqrt(2 * 13), chi2


def test_one_dimensional_input_and_edge_rates():
    rng = np.random.default_rng(4)
    tokens = np.asarray([256, 1, 2, 3, 299, 4, 5, 6, 7, 8, 9, 10, 257])
    inputs, labels = mask_tokens(tokens, rng, MASK, VOCAB, SPECIALS, mask_rate=0.5)
    assert inputs.shape == labels.shape == tokens.shape and (labels != IGNORE_INDEX).sum() == 5  # 10 eligible
    _, labels = mask_tokens(tokens[:-2], rng, MASK, VOCAB, SPECIALS, mask_rate=0.5)
    assert (labels != IGNORE_INDEX).sum() == 4  # 9 eligible: round(4.5) is 4, half to even
    inputs, labels = mask_tokens(tokens, rng, MASK, VOCAB, SPECIALS, mask_rate=1.0, replace_rate=1.0, random_rate=0.0)
    assert np.array_equal(labels != IGNORE_INDEX, ~np.isin(tokens, SPECIALS))
    assert np.array_equal(inputs, np.where(np.isin(tokens, SPECIALS), tokens, MASK))
    inputs, labels = mask_tokens(tokens, rng, MASK, VOCAB, SPECIALS, mask_rate=0.0)
    assert np.array_equal(inputs, tokens) and (labels == IGNORE_INDEX).all()
    inputs, labels = mask_tokens(np.full(6, MASK), rng, MASK, VOCAB, ())  # an already masked position is special
    assert (labels == IGNORE_INDEX).all()


def test_ignore_index_is_the_engines():
    from engine.model.head import IGNORE_INDEX as HEAD_IGNORE_INDEX

    assert IGNORE_INDEX == HEAD_IGNORE_INDEX


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask_rate": 1.2}, r"mask_rate 1.2 is outside \[0, 1\]"),
        ({"replace_rate": -0.1}, r"replace_rate -0.1 is outside \[0, 1\]"),
        ({"random_rate": float("nan")}, r"random_rate nan is outside \[0, 1\]"),
        ({"replace_rate": 0.8, "random_rate": 0.3}, "exceeds 1"),
        ({"tokens": np.zeros((2, 2, 2), dtype=np.int64)}, r"shape \(seq,\) or \(batch, seq\)"),
        ({"tokens": np.zeros(4)}, "integer tokens"),
        ({"mask_id": VOCAB}, "mask_id"),
    ],
)
def test_bad_input_fails_in_one_line(kwargs, match):
    args = {"tokens": np.arange(8), "rng": np.random.default_rng(0), "mask_id": MASK, "vocab_size": VOCAB}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match) as e:
        mask_tokens(special_ids=SPECIALS, **args)
    assert "\n" not in str(e.value)
