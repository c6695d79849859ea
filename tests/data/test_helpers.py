"""Sample-index and blending-index builders: C++ == NumPy == Python loop, and the Megatron semantics themselves."""

import sys
import warnings

import numpy as np
import pytest

from engine.data import helpers as h

needs_cpp = pytest.mark.skipif(not h.cpp_available(), reason="engine.data._helpers not built (setup.py build_ext)")


def _random_case(rng: np.random.Generator, trial: int) -> tuple:
    n = int(rng.integers(1, 25))
    high = (2, 4, 40, 300)[trial % 4]  # many empty and 1-token documents in the first kinds
    sizes = rng.integers(0, high, n).astype(np.int32)
    if sizes.sum() == 0:
        sizes[rng.integers(n)] = 1
    epochs = int(rng.integers(1, 4))
    document_idx = np.tile(np.arange(n), epochs)
    rng.shuffle(document_idx)
    document_idx = document_idx.astype(np.int32 if trial % 2 else np.int64)
    seq_length = int(rng.integers(1, 2 * high + 2))  # often longer than any document
    return sizes, document_idx, seq_length, epochs, int(sizes.sum())


def _stream_samples(sizes, document_idx, seq_length, extra, sample_idx) -> None:
    """Every sample read through the index equals the slice [k*L, k*L + L + extra) of the concatenated stream."""
    starts = np.concatenate([[0], np.cumsum(sizes[document_idx].astype(np.int64))])
    total = int(starts[-1])
    for k in range(len(sample_idx) - 1):
        (d0, o0), (d1, o1) = sample_idx[k], sample_idx[k + 1]
        begin, end = starts[d0] + o0, starts[d1] + o1 + extra
        assert begin == k * seq_length
        assert end == min((k + 1) * seq_length + extra, total)


@needs_cpp
def test_cpp_numpy_python_agree_on_random_documents():
    rng = np.random.default_rng(1234)
    for trial in range(200):
        sizes, document_idx, seq_length, epochs, tokens_per_epoch = _random_case(rng, trial)
        for drop_last in (True, False):
            for extra in (0, 1):
                args = (sizes, document_idx, seq_length, epochs, tokens_per_epoch, drop_last, extra)
                ref = h.build_sample_idx_python(*args)
                for impl in ("numpy", "cpp"):
                    got = h.build_sample_idx(*args, impl=impl)
                    assert got.dtype == ref.dtype == np.int32
                    np.testing.assert_array_equal(got, ref, err_msg=f"{impl} trial {trial} {args}")


EDGE_CASES = [
    ([7], [0], 3, 1),  # one document
    ([7], [0, 0, 0], 3, 3),  # one document, three epochs
    ([0, 0, 5, 0, 0], [0, 1, 2, 3, 4], 2, 1),  # empty documents around the only tokens, leading and trailing
    ([1, 1, 1, 1, 1, 1], [5, 4, 3, 2, 1, 0], 1, 1),  # 1-token documents, seq_length 1
    ([3, 4], [1, 0], 6, 1),  # seq_length longer than every document: exactly one sample
    ([2, 9, 0, 1], [3, 2, 1, 0, 0, 1, 2, 3], 5, 2),  # two epochs
]


@needs_cpp
@pytest.mark.parametrize("sizes, document_idx, seq_length, epochs", EDGE_CASES)
def test_edge_cases_agree(sizes, document_idx, seq_length, epochs):
    sizes = np.array(sizes, np.int32)
    document_idx = np.array(document_idx, np.int64)
    tokens_per_epoch = int(sizes.sum())
    for drop_last in (True, False):
        for extra in (0, 1):
            args = (sizes, document_idx, seq_length, epochs, tokens_per_epoch, drop_last, extra)
            ref = h.build_sample_idx_python(*args)
            np.testing.assert_array_equal(h.build_sample_idx(*args, impl="numpy"), ref)
            np.testing.assert_array_equal(h.build_sample_idx(*args, impl="cpp"), ref)
            _stream_samples(sizes, document_idx, seq_length, extra, ref)


@needs_cpp
def test_cpp_numpy_agree_on_larger_inputs():
    rng = np.random.default_rng(7)
    sizes = np.maximum(rng.lognormal(5.0, 1.2, 20_000), 0).astype(np.int32)
    sizes[rng.integers(0, len(sizes), 500)] = 0
    sizes[rng.integers(0, len(sizes), 500)] = 1
    for epochs, seq_length in ((1, 2048), (3, 97), (2, 5)):
        document_idx = np.tile(np.arange(len(sizes), dtype=np.int32), epochs)
        rng.shuffle(document_idx)
        for drop_last in (True, False):
            args = (sizes, document_idx, seq_length, epochs, int(sizes.sum()), drop_last, 1)
            cpp, numpy = h.build_sample_idx(*args, impl="cpp"), h.build_sample_idx(*args, impl="numpy")
            np.testing.assert_array_equal(cpp, numpy)


def test_hand_computed_example():
    # Documents of 3, 5, 2 tokens; stream positions 0..9. seq_length 4 (+1 label token): (10 - 1) // 4 = 2 samples,
    # [0, 5) and [4, 9): sample 1 starts at token 1 of document 1; sample 2 would start at token 0 of document 2.
    sizes = np.array([3, 5, 2], dtype=np.int32)
    document_idx = np.array([0, 1, 2], dtype=np.int32)
    for impl in ("numpy", "auto"):
        got = h.build_sample_idx(sizes, document_idx, 4, 1, 10, impl=impl)
        np.testing.assert_array_equal(got, [[0, 0], [1, 1], [2, 0]])
        # Keeping the partial last sample: a third one, [8, 10), ends at the last document (offset 2 - 1).
        got = h.build_sample_idx(sizes, document_idx, 4, 1, 10, drop_last_partial_sequence=False, impl=impl)
        np.testing.assert_array_equal(got, [[0, 0], [1, 1], [2, 0], [2, 1]])


def test_samples_tile_the_token_stream():
    rng = np.random.default_rng(5)
    for trial in range(60):
        sizes, document_idx, seq_length, epochs, tokens_per_epoch = _random_case(rng, trial)
        for extra in (0, 1):
            for drop_last in (True, False):
                idx = h.build_sample_idx(sizes, document_idx, seq_length, epochs, tokens_per_epoch, drop_last, extra)
                expected = (epochs * tokens_per_epoch - extra) / seq_length
                assert len(idx) - 1 == (int(expected) if drop_last else int(np.ceil(expected)))
                _stream_samples(sizes, document_idx, seq_length, extra, idx)


@pytest.mark.parametrize("impl", ["numpy", pytest.param("cpp", marks=needs_cpp)])
def test_sample_idx_bad_input(impl):
    sizes = np.array([3, 5, 2], dtype=np.int32)
    docs = np.array([0, 1, 2], dtype=np.int32)
    with pytest.raises(ValueError, match="fewer tokens"):
        h.build_sample_idx(sizes, docs, 2, 2, 10, impl=impl)  # claims 20 tokens, holds 10
    with pytest.raises(ValueError, match="outside sizes"):
        h.build_sample_idx(sizes, np.array([0, 3], dtype=np.int32), 2, 1, 10, impl=impl)
    with pytest.raises(ValueError, match="int32"):
        h.build_sample_idx(sizes.astype(np.int64), docs, 2, 1, 10, impl=impl)
    with pytest.raises(ValueError, match="seq_length"):
        h.build_sample_idx(sizes, docs, 0, 1, 10, impl=impl)
    with pytest.raises(ValueError, match="empty"):
        h.build_sample_idx(sizes, docs[:0], 2, 1, 10, impl=impl)


def test_bad_impl_name():
    with pytest.raises(ValueError, match="impl must be one of"):
        h.build_sample_idx(np.array([4], np.int32), np.array([0], np.int32), 2, 1, 4, impl="fortran")


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    h._extension.cache_clear()
    monkeypatch.setitem(sys.modules, "engine.data._helpers", None)  # makes the import raise ImportError
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = h.build_sample_idx(np.array([9], np.int32), np.array([0], np.int32), 2, 1, 9)
            b, _ = h.build_blending_indices([0.5, 0.5], 4)
        assert len([w for w in caught if "not built" in str(w.message)]) == 1
        np.testing.assert_array_equal(a, [[0, 0], [0, 2], [0, 4], [0, 6], [0, 8]])
        np.testing.assert_array_equal(b, [0, 1, 0, 1])
        with pytest.raises(ImportError, match="not built"):
            h.build_blending_indices([1.0], 3, impl="cpp")
    finally:
        monkeypatch.undo()
        h._extension.cache_clear()


@needs_cpp
def test_blending_cpp_equals_numpy():
    rng = np.random.default_rng(0)
    for trial in range(60):
        k = int(rng.integers(1, 7))
        weights = rng.random(k) ** 3 + (1e-3 if trial % 2 else 0)  # some near-zero weights
        weights /= weights.sum()
        size = int(rng.integers(0, 5000))
        a_index, a_sample = h.build_blending_indices(weights, size, impl="numpy")
        b_index, b_sample = h.build_blending_indices(weights, size, impl="cpp")
        assert a_index.dtype == b_index.dtype == np.int16 and a_sample.dtype == b_sample.dtype == np.int64
        np.testing.assert_array_equal(a_index, b_index)
        np.testing.assert_array_equal(a_sample, b_sample)
    # exact ties (equal weights) resolve to the lowest dataset index in both
    for impl in ("numpy", "cpp"):
        index, sample = h.build_blending_indices(np.full(3, 1 / 3), 7, impl=impl)
        np.testing.assert_array_equal(index, [0, 1, 2, 0, 1, 2, 0])
        np.testing.assert_array_equal(sample, [0, 0, 0, 1, 1, 1, 2])


def test_blending_tracks_weights_on_every_prefix():
    weights = np.array([0.7, 0.2, 0.1])
    index, sample = h.build_blending_indices(weights, 20_000)
    counts = np.stack([np.cumsum(index == d) for d in range(3)], axis=1)  # drawn so far, per dataset
    target = np.arange(1, len(index) + 1)[:, None] * weights
    assert np.abs(counts - target).max() <= 1.0
    for d in range(3):  # each dataset's samples are drawn in order 0, 1, 2, ...
        np.testing.assert_array_equal(sample[index == d], np.arange((index == d).sum()))
