"""The embedded default corpus, tokenised once into the cache and reused by every later run.

Layout: `$ENGINE_CACHE/embedded/<tokenizer fingerprint>-<corpus key>/{train,valid}.{bin,idx}`, plus
`tokenizer.json` (for BPE / tokenizer.json specs) and `meta.json` (counts). The directory is built under a temporary
name and renamed into place, so its existence means it is complete; an fcntl lock makes concurrent callers (all ranks
of a job, or two jobs) wait while one of them prepares it instead of duplicating the work.
"""

import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.data._files import cache_root, file_lock, fsync_dir, temp_path
from engine.data.corpus import CORPUS_VERSION, corpus_key, documents
from engine.data.indexed_dataset import IndexedDatasetBuilder
from engine.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

CHUNK_DOCS = 32  # documents per encode_batch call: keeps memory flat while letting `tokenizers` use its threads


@dataclass(frozen=True)
class EmbeddedData:
    """The prepared embedded corpus: dataset prefixes of both splits and the tokenizer they were made with."""

    train_prefix: str
    valid_prefix: str
    tokenizer: Tokenizer
    directory: str = ""
    meta: dict = field(default_factory=dict)  # documents and tokens per split, preparation seconds, tokenizer


def tokenize_to_dataset(
    texts: Iterable[str], tokenizer: Tokenizer, prefix: str, append_eod: bool = True
) -> tuple[int, int]:
    """Writes one document per text (EOD-terminated by default) to PREFIX.bin/.idx; returns (documents, tokens)."""
    texts = list(texts)
    with IndexedDatasetBuilder(prefix, vocab_size=tokenizer.vocab_size) as builder:
        for start in range(0, len(texts), CHUNK_DOCS):
            for ids in tokenizer.encode_batch(texts[start : start + CHUNK_DOCS]):
                builder.add_document(ids + [tokenizer.eod_id] if append_eod else ids)
        n_docs, n_tokens = len(texts), builder.num_tokens
    return n_docs, n_tokens


def prepare_embedded(
    cache_dir: str | None = None, tokenizer: str | Tokenizer = "bpe", bpe_vocab: int = 4096
) -> EmbeddedData:
    """Tokenises the embedded corpus (train and valid splits) into the cache, or reuses an earlier preparation."""
    root = cache_root(cache_dir)
    tok = load_tokenizer(tokenizer, root, bpe_vocab)
    directory = os.path.join(root, "embedded", f"{tok.fingerprint}-{corpus_key()}")
    if not os.path.isfile(os.path.join(directory, "meta.json")):
        with file_lock(directory + ".lock"):
            if not os.path.isfile(os.path.join(directory, "meta.json")):
                _build(directory, tok)
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    return EmbeddedData(
        train_prefix=os.path.join(directory, "train"),
        valid_prefix=os.path.join(directory, "valid"),
        tokenizer=tok,
        directory=directory,
        meta=meta,
    )


def _build(directory: str, tok: Tokenizer) -> None:
    t0 = time.perf_counter()
    tmp = temp_path(directory)
    os.makedirs(tmp)
    try:
        meta = {"corpus_version": CORPUS_VERSION, "tokenizer": tok.name, "vocab_size": tok.vocab_size}
        for split in ("train", "valid"):
            docs = documents(split)
            if not docs:
                raise ValueError(f"embedded corpus: the {split} split is empty on this Python installation")
            n_docs, n_tokens = tokenize_to_dataset([d.text for d in docs], tok, os.path.join(tmp, split))
            meta[split] = {"documents": n_docs, "tokens": n_tokens, "bytes": sum(len(d.text.encode()) for d in docs)}
        if isinstance(tok, HFTokenizer):
            tok.save(os.path.join(tmp, "tokenizer.json"))
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.isdir(directory):  # left by a preparation that died before writing meta.json
            shutil.rmtree(directory)
        os.rename(tmp, directory)
        fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
