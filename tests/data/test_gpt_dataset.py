"""GPTDataset: windows stitched across documents, Megatron epoch/shuffle structure, the index cache, bad input."""

import os
import threading

import numpy as np
import pytest

from engine.data import gpt_dataset
from engine.data.gpt_dataset import GPTDataset, GPTDatasetError, build_indices
from engine.data.helpers import cpp_available
from engine.data.indexed_dataset import IndexedDataset


def _docs(rng: np.random.Generator, n: int, high: int = 40, vocab: int = 1000) -> list[np.ndarray]:
    return [rng.integers(0, vocab, int(rng.integers(1, high))) for _ in range(n)]


def _check_samples_are_stream_windows(gpt: GPTDataset, ds: IndexedDataset) -> None:
    stream = np.concatenate([ds[int(d)] for d in gpt.document_index]).astype(np.int64)
    L = gpt.seq_len
    for k in range(len(gpt)):
        i = int(gpt.shuffle_index[k])
        tokens = gpt[k]["tokens"]
        assert tokens.dtype == np.int64 and tokens.shape == (L + 1,)
        np.testing.assert_array_equal(tokens, stream[i * L : i * L + L + 1])


def test_samples_are_windows_of_the_shuffled_stream(make_dataset):
    rng = np.random.default_rng(0)
    ds = IndexedDataset(make_dataset(_docs(rng, 50) + [[7]] * 3))  # some 1-token documents
    for seq_len in (1, 8, 37, 100):  # 100: longer than any document
        gpt = GPTDataset(ds, num_samples=None, seq_len=seq_len, seed=3)
        assert len(gpt) == (ds.num_tokens - 1) // seq_len
        assert np.array_equal(np.sort(gpt.document_index), np.arange(len(ds)))  # one epoch: each document once
        assert np.array_equal(np.sort(gpt.shuffle_index), np.arange(len(gpt)))
        _check_samples_are_stream_windows(gpt, ds)


def test_epochs_and_separate_final_epoch(make_dataset):
    rng = np.random.default_rng(1)
    docs = _docs(rng, 40)
    prefix = make_dataset(docs)
    ds = IndexedDataset(prefix)
    n_docs, tokens, L = len(docs), ds.num_tokens, 16
    per_epoch = (tokens - 1) // L

    # 2.3 epochs' worth: the third epoch is below 80% of an epoch, so it is shuffled on its own
    wanted = int(2.3 * per_epoch)
    gpt = GPTDataset(prefix, num_samples=wanted, seq_len=L, seed=11)
    assert gpt.num_epochs == 3 and len(gpt) >= wanted
    assert np.array_equal(np.sort(gpt.document_index[-n_docs:]), np.arange(n_docs))
    before_final = (2 * tokens - 1) // L
    assert np.array_equal(np.sort(gpt.shuffle_index[:before_final]), np.arange(before_final))
    _check_samples_are_stream_windows(gpt, ds)

    # 2.9 epochs' worth: one joint shuffle over all three epochs (the last block is not a permutation of the docs)
    gpt = GPTDataset(prefix, num_samples=int(2.9 * per_epoch), seq_len=L, seed=11)
    assert gpt.num_epochs == 3
    assert np.array_equal(np.sort(gpt.document_index), np.repeat(np.arange(n_docs), 3))
    assert not np.array_equal(np.sort(gpt.document_index[-n_docs:]), np.arange(n_docs))
    _check_samples_are_stream_windows(gpt, ds)


def test_deterministic_in_seed_and_same_for_both_builders(make_dataset):
    ds = IndexedDataset(make_dataset(_docs(np.random.default_rng(2), 30)))
    a = GPTDataset(ds, 50, 12, seed=5)
    b = GPTDataset(ds, 50, 12, seed=5, impl="numpy")
    c = GPTDataset(ds, 50, 12, seed=6)
    for k in range(50):
        np.testing.assert_array_equal(a[k]["tokens"], b[k]["tokens"])
    assert any(not np.array_equal(a[k]["tokens"], c[k]["tokens"]) for k in range(50))
    # the index construction is Megatron's sequence of RandomState draws: document shuffle, then sample shuffle
    doc_idx, _, shuf = build_indices(ds.sequence_lengths, np.arange(len(ds)), None, 12, 5)
    rs = np.random.RandomState(5)
    expected_docs = np.arange(len(ds), dtype=np.int32)
    rs.shuffle(expected_docs)
    np.testing.assert_array_equal(doc_idx, expected_docs)
    expected_shuffle = np.arange(len(shuf), dtype=np.uint32)
    rs.shuffle(expected_shuffle)
    np.testing.assert_array_equal(shuf, expected_shuffle)


def test_index_cache_is_reused_and_keyed(make_dataset, tmp_path):
    rng = np.random.default_rng(3)
    prefix = make_dataset(_docs(rng, 30))
    cache = str(tmp_path / "cache")
    first = GPTDataset(prefix, 40, 10, seed=1, cache_dir=cache)
    assert not first.cache_hit
    files = sorted(os.listdir(cache))
    assert sum(f.endswith(".npy") for f in files) == 3 and not any(".tmp-" in f for f in files)
    second = GPTDataset(prefix, 40, 10, seed=1, cache_dir=cache)
    assert second.cache_hit
    for name in ("document_index", "sample_index", "shuffle_index"):  # zero-copy views of the cached files
        array = getattr(second, name)
        assert type(array) is np.ndarray and isinstance(array.base, np.memmap) and not array.flags.writeable
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    for k in range(len(first)):
        np.testing.assert_array_equal(first[k]["tokens"], second[k]["tokens"])
    # any input that changes the indices is a different key
    for kwargs in ({"seed": 2}, {"seq_len": 11}, {"num_samples": 41}, {"split": "valid"}):
        args = {"num_samples": 40, "seq_len": 10, "seed": 1, **kwargs}
        assert not GPTDataset(prefix, cache_dir=cache, **args).cache_hit
    # so is different data under the same prefix
    prefix2 = make_dataset(_docs(rng, 31), name=os.path.basename(prefix))
    assert prefix2 == prefix
    assert not GPTDataset(prefix, 40, 10, seed=1, cache_dir=cache).cache_hit


def test_stitching_reads_through_get_with_offsets(make_dataset):
    # documents 0..4 of lengths 3, 1, 4, 2, 6 holding consecutive integers: every window is a run of integers
    lengths = [3, 1, 4, 2, 6]
    starts = np.concatenate([[0], np.cumsum(lengths)])
    prefix = make_dataset([np.arange(starts[i], starts[i + 1]) for i in range(5)])
    gpt = GPTDataset(prefix, None, 5, seed=0)
    order = np.concatenate([np.arange(starts[d], starts[d + 1]) for d in gpt.document_index])
    for k in range(len(gpt)):
        i = int(gpt.shuffle_index[k])
        np.testing.assert_array_equal(gpt[k]["tokens"], order[5 * i : 5 * i + 6])
    with pytest.raises(IndexError):
        gpt[len(gpt)]


def test_bad_input_one_line_errors(make_dataset):
    prefix = make_dataset([np.arange(10), np.arange(5)])
    with pytest.raises(GPTDatasetError, match=r"seq_len 15 needs 16 tokens .* only 15") as e:
        GPTDataset(prefix, 10, 15, seed=0)
    assert "\n" not in str(e.value) and prefix + ".idx" in str(e.value)

    high = make_dataset([[1, 2, 300], [4, 5]], name="high")
    with pytest.raises(GPTDatasetError, match=r"token id 300 is outside the vocabulary \[0, 256\)") as e:
        GPTDataset(high, None, 2, seed=0, vocab_size=256)
    assert high + ".bin" in str(e.value) and "\n" not in str(e.value)
    GPTDataset(high, None, 2, seed=0, vocab_size=301)  # 300 < 301 is fine

    empty = make_dataset([], name="empty")
    with pytest.raises(GPTDatasetError, match="empty dataset") as e:
        GPTDataset(empty, None, 4, seed=0)
    assert empty + ".idx" in str(e.value)
    with pytest.raises(FileNotFoundError):
        GPTDataset(prefix + "-missing", None, 4, seed=0)
    with pytest.raises(GPTDatasetError, match="num_samples"):
        GPTDataset(prefix, 0, 4, seed=0)


@pytest.mark.parametrize("chunk", [1, 2, 3, 1 << 24])
def test_vocab_scan_sees_every_chunk(make_dataset, monkeypatch, chunk):
    """The min/max scan over the .bin is chunked: ids outside the vocabulary are found in any chunk."""
    monkeypatch.setattr(gpt_dataset, "_RANGE_CHUNK", chunk)
    low = make_dataset([[5, 6, -1], [7, 8]], name="low", dtype=np.int32)
    with pytest.raises(GPTDatasetError, match=r"token id -1 is outside"):
        GPTDataset(low, None, 2, seed=0, vocab_size=10)
    high = make_dataset([[5, 6, 7], [8, 300]], name="high", dtype=np.int32)  # the bad id in the last chunk
    with pytest.raises(GPTDatasetError, match=r"token id 300 is outside"):
        GPTDataset(high, None, 2, seed=0, vocab_size=300)
    GPTDataset(high, None, 2, seed=0, vocab_size=301)


def test_vocab_check_is_cached(make_dataset, tmp_path):
    high = make_dataset([[1, 2, 300], [4, 5]], name="high")
    cache = str(tmp_path / "c")
    with pytest.raises(GPTDatasetError, match="300"):
        GPTDataset(high, None, 2, seed=0, vocab_size=256, cache_dir=cache)
    assert any(f.startswith("tokens-") for f in os.listdir(cache))
    with pytest.raises(GPTDatasetError, match="300"):  # answered from the memo
        GPTDataset(high, None, 2, seed=0, vocab_size=256, cache_dir=cache)


@pytest.mark.skipif(not cpp_available(), reason="engine.data._helpers not built")
def test_many_epochs_of_a_tiny_dataset(make_dataset):
    prefix = make_dataset([[1, 2, 3], [4, 5]])  # 5 tokens: 2 samples of 2 (+1) per epoch
    gpt = GPTDataset(prefix, 100, 2, seed=0)
    assert gpt.num_epochs == 41 and len(gpt) >= 100
    _check_samples_are_stream_windows(gpt, IndexedDataset(prefix))


def test_concurrent_construction_builds_once(make_dataset, tmp_path):
    # ranks of one job construct the same dataset at once: one builds under the lock, the others reuse its files
    prefix = make_dataset(_docs(np.random.default_rng(4), 40))
    cache = str(tmp_path / "shared")
    results: list[GPTDataset] = []
    threads = [
        threading.Thread(target=lambda: results.append(GPTDataset(prefix, 300, 7, seed=9, cache_dir=cache)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.cache_hit for r in results) == [False, True, True]
    for r in results[1:]:
        np.testing.assert_array_equal(r.shuffle_index, results[0].shuffle_index)
        np.testing.assert_array_equal(r.sample_index, results[0].sample_index)
    assert not any(".tmp-" in f for f in os.listdir(cache))


def test_round_trip_text_to_samples(tmp_path):
    # text -> byte tokenizer -> .bin/.idx -> GPTDataset (vocab-checked) -> samples that decode to windows of the text
    from engine.data.embedded import tokenize_to_dataset
    from engine.data.tokenizer import load_tokenizer

    tok = load_tokenizer("byte")
    texts = [f"document {i}: " + "lorem ipsum " * (i % 7) for i in range(40)]
    prefix = str(tmp_path / "text")
    tokenize_to_dataset(texts, tok, prefix)
    gpt = GPTDataset(prefix, 120, 16, seed=2, vocab_size=tok.vocab_size, cache_dir=str(tmp_path / "c"))
    encoded = [np.array(tok.encode(t) + [tok.eod_id]) for t in texts]
    stream = np.concatenate([encoded[int(d)] for d in gpt.document_index])
    for k in range(120):
        i = int(gpt.shuffle_index[k])
        tokens = gpt[k]["tokens"]
        np.testing.assert_array_equal(tokens, stream[16 * i : 16 * i + 17])
