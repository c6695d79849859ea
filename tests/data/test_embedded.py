"""The embedded corpus and its cached preparation: determinism, split, round trips, locking, reuse."""

import multiprocessing as mp
import os
import time

import pytest

from engine.data import corpus
from engine.data._files import file_lock
from engine.data.embedded import prepare_embedded
from engine.data.indexed_dataset import IndexedDataset
from engine.data.tokenizer import ByteTokenizer


def test_corpus_is_deterministic_and_split_by_document():
    train, valid, every = corpus.documents("train"), corpus.documents("valid"), corpus.documents()
    assert [d.name for d in every] == sorted(d.name for d in every) == [d.name for d in corpus.documents()]
    assert {d.name for d in train} | {d.name for d in valid} == {d.name for d in every}
    assert not {d.name for d in train} & {d.name for d in valid}
    assert 0.01 < len(valid) / len(every) < 0.15
    kinds = {d.name.split("/")[0] for d in every}
    assert kinds == {"code", "prose"} and {d.name.split("/")[0] for d in valid} == {"code", "prose"}
    size = sum(len(d.text) for d in every)
    assert 1_000_000 < size <= corpus.MAX_CODE_BYTES + 1_000_000
    assert not any("/test/" in d.name or "idlelib" in d.name for d in every)
    assert corpus.corpus_key() == corpus.corpus_key()
    with pytest.raises(ValueError, match="unknown corpus split 'test'"):
        corpus.documents("test")


def test_prepare_byte_round_trip_and_reuse(engine_cache):
    # No cache_dir: $ENGINE_CACHE (the session's private cache) is used.
    t0 = time.perf_counter()
    data = prepare_embedded(tokenizer="byte")
    cold = time.perf_counter() - t0
    assert data.directory.startswith(os.path.join(engine_cache, "embedded"))
    tok = data.tokenizer
    for split, prefix in (("train", data.train_prefix), ("valid", data.valid_prefix)):
        docs = corpus.documents(split)
        ds = IndexedDataset(prefix)
        assert len(ds) == len(docs) == data.meta[split]["documents"]
        assert ds.num_tokens == data.meta[split]["tokens"] == sum(len(d.text.encode()) + 1 for d in docs)
        for i in (0, len(docs) // 2, len(docs) - 1):
            assert tok.decode(ds[i]) == docs[i].text + "<|endoftext|>"
    t0 = time.perf_counter()
    again = prepare_embedded(engine_cache, tokenizer="byte")
    warm = time.perf_counter() - t0
    assert again.directory == data.directory and again.meta == data.meta
    assert warm < max(cold / 2, 0.5)
    # Only finished directories and lock files: no temporary leftovers.
    assert not [p for p in os.listdir(os.path.dirname(data.directory)) if p.startswith(".")]


def test_prepare_with_bpe(bpe_tokenizer, tmp_path, monkeypatch):
    # The real BPE on a slice of the corpus (tokenising all of it with BPE takes ~10 s here: measured, not tested).
    import engine.data.embedded as embedded

    monkeypatch.setattr(embedded, "documents", lambda split: corpus.documents(split)[:12])
    data = prepare_embedded(str(tmp_path), tokenizer=bpe_tokenizer)
    assert data.tokenizer is bpe_tokenizer and bpe_tokenizer.fingerprint in data.directory
    for split, prefix in (("train", data.train_prefix), ("valid", data.valid_prefix)):
        ds, docs = IndexedDataset(prefix), corpus.documents(split)[:12]
        assert ds.dtype.name == "uint16" and len(ds) == len(docs)
        assert [bpe_tokenizer.decode(x) for x in ds[:]] == [d.text + "<|endoftext|>" for d in docs]
        assert data.meta[split]["tokens"] < data.meta[split]["bytes"] / 2  # BPE compresses
    # The directory is self-contained: its tokenizer.json loads as the same tokenizer.
    from engine.data.tokenizer import load_tokenizer

    assert load_tokenizer(os.path.join(data.directory, "tokenizer.json")).fingerprint == bpe_tokenizer.fingerprint


def _prepare(cache: str) -> tuple[str, float]:
    data = prepare_embedded(cache, tokenizer="byte")
    return data.directory, data.meta["seconds"]


def test_concurrent_callers_wait_and_share_one_preparation(tmp_path):
    from engine.data.corpus import corpus_key

    cache = str(tmp_path)
    directory = os.path.join(cache, "embedded", f"{ByteTokenizer().fingerprint}-{corpus_key()}")
    with mp.get_context("spawn").Pool(2) as pool:
        with file_lock(directory + ".lock"):  # as if another job were preparing
            pending = [pool.apply_async(_prepare, (cache,)) for _ in range(2)]
            time.sleep(1.5)
            assert not any(p.ready() for p in pending) and not os.path.exists(directory)
        results = [p.get(timeout=120) for p in pending]
    # Same directory and the same recorded preparation: built once, the other caller waited and reused it
    # (a second build would fail to rename onto the finished directory, or record a different time).
    assert results[0] == results[1] and results[0][0] == directory
    assert sorted(os.listdir(os.path.dirname(directory))) == sorted(
        [os.path.basename(directory), os.path.basename(directory) + ".lock"]
    )
