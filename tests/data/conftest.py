"""Shared fixtures for the data tests: a private ENGINE_CACHE, a tiny dataset builder, one trained BPE tokenizer."""

import os

import numpy as np
import pytest


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory) -> str:
    """A session-wide cache directory, so tests never write to ~/.cache (and the BPE is trained at most once)."""
    return str(tmp_path_factory.mktemp("engine_cache"))


@pytest.fixture(autouse=True)
def _private_engine_cache(engine_cache, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE", engine_cache)


@pytest.fixture
def make_dataset(tmp_path):
    """make_dataset(docs, name="ds", dtype=np.uint16) -> prefix: writes one sequence per document."""
    from engine.data.indexed_dataset import IndexedDatasetBuilder

    def make(docs, name: str = "ds", dtype=np.uint16) -> str:
        prefix = os.path.join(tmp_path, name)
        with IndexedDatasetBuilder(prefix, dtype) as builder:
            for doc in docs:
                builder.add_document(np.asarray(doc))
        return prefix

    return make


@pytest.fixture(scope="session")
def bpe_tokenizer(engine_cache):
    """The 4096-token BPE trained on the embedded corpus, trained once per test session into the private cache."""
    from engine.data.tokenizer import load_tokenizer

    return load_tokenizer("bpe", cache_dir=engine_cache, bpe_vocab=4096)
