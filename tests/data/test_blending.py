"""Blends: spec parsing and its errors, realised proportions over every window, BlendedDataset over GPTDatasets."""

import math

import numpy as np
import pytest

from engine.data.blended_dataset import BlendedDataset, BlendError, build_dataset, parse_blend
from engine.data.gpt_dataset import GPTDataset
from engine.data.helpers import build_blending_indices, cpp_available


def _window_counts(dataset_index: np.ndarray, num_datasets: int, window: int) -> np.ndarray:
    """[num_windows, num_datasets]: how often each dataset occurs in every window of `window` consecutive samples."""
    onehot = np.eye(num_datasets, dtype=np.int64)[dataset_index]
    csum = np.concatenate([np.zeros((1, num_datasets), np.int64), np.cumsum(onehot, axis=0)])
    return csum[window:] - csum[:-window]


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.25, 0.125, 0.125], [0.97, 0.02, 0.01], [3.0, 1.0, 1.0]])
def test_proportions_within_one_percent_over_every_10k_window(weights):
    class Sized:  # indices only: a stand-in for a large dataset
        def __len__(self):
            return 10**9

    size, window = 100_000, 10_000
    blend = BlendedDataset([Sized() for _ in weights], weights, size)
    target = np.asarray(weights) / np.sum(weights)
    shares = _window_counts(blend.dataset_index, len(weights), window) / window
    assert shares.shape == (size - window + 1, len(weights))
    assert np.abs(shares - target).max() < 0.01
    # in fact the greedy is within a few samples of exact in every window, far inside 1%
    assert np.abs(shares - target).max() * window <= 3


def test_parse_blend_good_specs(make_dataset):
    a, b = make_dataset([[1, 2, 3]], name="a"), make_dataset([[4, 5, 6]], name="b")
    assert parse_blend(f"0.7 {a} 0.3 {b}") == [(0.7, a), (0.3, b)]
    assert parse_blend(f"  2 {a}\n 1e0 {b} ") == [(2.0, a), (1.0, b)]
    assert parse_blend(a) == [(1.0, a)]
    assert parse_blend(f"0 {a} 1 {b}") == [(0.0, a), (1.0, b)]


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("0.7 A 0.3", BlendError, r"has 3 items; expected 'weight prefix' pairs"),
        ("x7 A 0.3 B", BlendError, r"blend weight 'x7' \(before prefix 'A'\) is not a number"),
        ("0.7 A -0.3 B", BlendError, r"blend weight '-0.3' for prefix 'B' is negative"),
        ("0 A 0.0 B", BlendError, r"weights sum to 0"),
        ("nan A 1 B", BlendError, r"'nan' for prefix 'A' is not finite"),
        ("   ", BlendError, r"data path is empty"),
    ],
)
def test_parse_blend_errors(spec, error, match):
    with pytest.raises(error, match=match) as e:
        parse_blend(spec, check_exists=False)
    assert "\n" not in str(e.value)


def test_unknown_prefix_is_named(make_dataset):
    a = make_dataset([[1, 2, 3]], name="a")
    with pytest.raises(FileNotFoundError, match=r"blend prefix '/nonexistent/x': /nonexistent/x.idx and .*x.bin"):
        parse_blend(f"0.5 {a} 0.5 /nonexistent/x")
    with pytest.raises(FileNotFoundError, match=r"^data prefix '/nonexistent/x': /nonexistent/x.idx and"):
        parse_blend("/nonexistent/x")  # a single prefix is not a blend


def test_blended_gpt_datasets_draw_in_order_and_in_proportion(make_dataset, tmp_path):
    rng = np.random.default_rng(0)
    # dataset A holds token ids < 1000, B ids >= 1000, so a sample shows where it came from
    a = make_dataset([rng.integers(0, 1000, rng.integers(5, 50)) for _ in range(200)], name="a")
    b = make_dataset([rng.integers(1000, 2000, rng.integers(5, 50)) for _ in range(200)], name="b")
    blend = build_dataset(f"0.75 {a} 0.25 {b}", num_samples=2000, seq_len=4, seed=1, cache_dir=str(tmp_path / "c"))
    assert isinstance(blend, BlendedDataset) and len(blend) == 2000
    ga, gb = blend.datasets
    seen = {0: 0, 1: 0}
    for k in range(len(blend)):
        sample = blend[k]
        d = sample["dataset_id"]
        expected = (ga, gb)[d][seen[d]]["tokens"]  # each component is read in its own order 0, 1, 2, ...
        np.testing.assert_array_equal(sample["tokens"], expected)
        assert ((sample["tokens"] >= 1000) == bool(d)).all()
        seen[d] += 1
    assert abs(seen[0] - 1500) <= 1 and abs(seen[1] - 500) <= 1
    # a single prefix is a plain GPTDataset
    assert isinstance(build_dataset(a, 10, 4, seed=1), GPTDataset)


def test_blend_too_small_component_is_an_error():
    with pytest.raises(BlendError, match=r"blend dataset 1 .* has 10 samples but the blend draws 50"):
        BlendedDataset([range(1000), range(10)], [0.5, 0.5], 100)
    with pytest.raises(BlendError, match="one weight per dataset"):
        BlendedDataset([range(10)], [0.5, 0.5], 10)


# Weights that do not sum to 1. A blend depends only on the weights' proportions: (3, 1) is (0.75, 0.25), and
# (0.6, 0.6, 0.3) is (0.4, 0.4, 0.2). Using the raw weights anywhere (the greedy's targets, a component's size) gives
# a different blend, which weights that already sum to 1 cannot show.
UNNORMALISED = [([3.0, 1.0], [0.75, 0.25]), ([0.6, 0.6, 0.3], [0.4, 0.4, 0.2]), ([0.0, 2.0, 6.0], [0.0, 0.25, 0.75])]
IMPLS = ["numpy", "cpp"] if cpp_available() else ["numpy"]


def _normalise(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


class _Sized:
    """Indices only: a stand-in for a large dataset."""

    def __len__(self):
        return 10**9


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("raw, normalised", UNNORMALISED)
def test_blend_of_unnormalised_weights_equals_the_normalised_blend(raw, normalised, impl):
    size = 5000
    blend = BlendedDataset([_Sized() for _ in raw], raw, size, impl=impl)
    np.testing.assert_allclose(blend.weights, normalised, rtol=1e-15)
    assert blend.weights.sum() == pytest.approx(1.0, rel=1e-15)
    # the same interleaving, sample for sample, as the greedy run on the normalised weights (normalised as the blend
    # does it, w / sum(w): the greedy has exact ties, so the last bit of 0.6 / 1.5 versus 0.4 decides some picks)
    di, dsi = build_blending_indices(_normalise(raw), size, impl=impl)
    np.testing.assert_array_equal(blend.dataset_index, di)
    np.testing.assert_array_equal(blend.dataset_sample_index, dsi)
    # per-component counts: the normalised share of the size, to within one sample
    counts = np.bincount(blend.dataset_index, minlength=len(raw))
    assert counts.sum() == size
    assert np.abs(counts - np.asarray(normalised) * size).max() <= 1
    for d in range(len(raw)):  # each component is read in its own order 0, 1, 2, ...
        np.testing.assert_array_equal(blend.dataset_sample_index[blend.dataset_index == d], np.arange(counts[d]))


def test_unnormalised_blend_checks_component_sizes_against_normalised_shares():
    # (3, 1) over 100 samples draws 75 and 25: a 30-sample second component is enough, a 20-sample one is not
    BlendedDataset([range(1000), range(30)], [3.0, 1.0], 100)
    with pytest.raises(BlendError, match=r"blend dataset 1 .* has 20 samples but the blend draws 25"):
        BlendedDataset([range(1000), range(20)], [3.0, 1.0], 100)


def _component_sizes(shares, num_samples):
    """The size math of build_dataset: each component's share of the blend plus 0.5% and one sample of headroom."""
    return [math.ceil(share * num_samples * 1.005) + 1 for share in shares]


@pytest.mark.parametrize("raw, normalised", UNNORMALISED)
def test_build_dataset_sizes_components_from_normalised_weights(raw, normalised, make_dataset, tmp_path):
    rng = np.random.default_rng(3)
    prefixes = [
        make_dataset([rng.integers(1000 * d, 1000 * (d + 1), rng.integers(5, 40)) for _ in range(60)], name=f"p{d}")
        for d in range(len(raw))
    ]
    num_samples = 1200

    def spec(weights):
        return " ".join(f"{w} {p}" for w, p in zip(weights, prefixes))

    cache = str(tmp_path / "cache")
    blend = build_dataset(spec(raw), num_samples=num_samples, seq_len=4, seed=5, cache_dir=cache)
    ref = build_dataset(spec(normalised), num_samples=num_samples, seq_len=4, seed=5, cache_dir=cache)
    kept = [w for w in normalised if w > 0]  # zero-weight components are left out
    assert len(blend.datasets) == len(kept) and len(blend) == num_samples
    np.testing.assert_allclose(blend.weights, kept, rtol=1e-15)
    assert [ds.num_samples for ds in blend.datasets] == _component_sizes(kept, num_samples)
    assert [ds.num_samples for ds in blend.datasets] == [ds.num_samples for ds in ref.datasets]
    di, dsi = build_blending_indices(_normalise([w for w in raw if w > 0]), num_samples)
    np.testing.assert_array_equal(blend.dataset_index, di)
    np.testing.assert_array_equal(blend.dataset_sample_index, dsi)
    # every component is sized to cover what the blend draws from it, and not grossly more
    drawn = np.bincount(blend.dataset_index, minlength=len(kept))
    for n, ds in zip(drawn, blend.datasets):
        assert n <= ds.num_samples <= n * 1.005 + 3
    # the components are the very datasets the normalised spec builds (same size, same seed)
    for k in range(0, num_samples, 97):
        d, j = int(blend.dataset_index[k]), int(blend.dataset_sample_index[k])
        np.testing.assert_array_equal(blend[k]["tokens"], ref.datasets[d][j]["tokens"])
        assert blend[k]["dataset_id"] == d
