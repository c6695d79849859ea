"""A tiny byte-level dataset and config for training-loop tests (no embedded corpus needed)."""

import inspect
import json

import pytest


def build_tiny_data(root) -> tuple[str, str]:
    """Train/valid indexed datasets of stdlib source as bytes (learnable, ids < 256); returns their prefixes."""
    from engine.data.indexed_dataset import IndexedDatasetBuilder

    text = inspect.getsource(json.decoder) + inspect.getsource(json.encoder)
    docs = [d.encode() for d in text.split("\n\n") if len(d) > 20]
    prefixes = []
    for name, part in (("train", docs[: len(docs) - 8]), ("valid", docs[-8:])):
        prefix = str(root / name)
        builder = IndexedDatasetBuilder(prefix, vocab_size=256)
        for d in part:
            builder.add_document(list(d))
        builder.finalize()
        prefixes.append(prefix)
    return prefixes[0], prefixes[1]


def build_document_data(root, eod_id: int = 256) -> tuple[str, str]:
    """Like `build_tiny_data`, with short documents (the source's lines, 1 to 60 bytes) each ending in the byte
    tokenizer's EOD, so a 32-token sample packs several: for document masking and per-document positions."""
    from engine.data.indexed_dataset import IndexedDatasetBuilder

    text = inspect.getsource(json.decoder) + inspect.getsource(json.encoder)
    docs = [line.strip().encode()[:60] for line in text.splitlines() if line.strip()]
    prefixes = []
    for name, part in (("train", docs[: len(docs) - 40]), ("valid", docs[-40:])):
        prefix = str(root / name)
        builder = IndexedDatasetBuilder(prefix, vocab_size=272)
        for d in part:
            builder.add_document([*d, eod_id])
        builder.finalize()
        prefixes.append(prefix)
    return prefixes[0], prefixes[1]


def tiny_args(run_dir, train_prefix, valid_prefix, **overrides) -> list[str]:
    """Flags for a ~1 s run: 2 layers, d_model 32, seq 32, global batch 4."""
    flags = {
        "model.n_layers": 2,
        "model.d_model": 32,
        "model.n_heads": 2,
        "model.seq_len": 32,
        "train.steps": 6,
        "train.global_batch": 4,
        "optim.warmup": 2,
        "optim.decay_steps": 6,
        "data.path": train_prefix,
        "data.valid_path": valid_prefix,
        "data.tokenizer": "byte",
        "eval.every": 3,
        "eval.batches": 2,
        "checkpoint.every": 3,
        "run.dir": str(run_dir),
        "run.progress": "false",
        "run.tensorboard": "false",
    }
    flags.update({k.replace("__", "."): v for k, v in overrides.items()})
    out = []
    for k, v in flags.items():
        out += [f"--{k}", str(v)]
    return out


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory) -> str:
    """A session-wide ENGINE_CACHE, so training tests never write index caches to ~/.cache."""
    return str(tmp_path_factory.mktemp("engine_cache"))


@pytest.fixture(autouse=True)
def _private_engine_cache(engine_cache, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE", engine_cache)  # spawned ranks inherit it


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def document_data(tmp_path_factory):
    return build_document_data(tmp_path_factory.mktemp("document_data"))
