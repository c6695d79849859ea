"""Exact dedup: documents whose text is byte-identical after the steps before it keep only the first copy (corpus
order: input files in the order given, then line order)."""

import hashlib
from dataclasses import dataclass

import numpy as np

from engine.data.curation.steps import DedupStep, register_step


@register_step
@dataclass
class ExactDedup(DedupStep):
    """Key: a 128-bit BLAKE2b hash of the UTF-8 text (a collision among 2^40 documents has probability ~1e-15)."""

    name = "exact_dedup"
    reason = "exact_duplicate"

    def keys(self, texts: list[str]) -> np.ndarray:
        digests = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts)
        return np.frombuffer(digests, dtype="<u8").reshape(len(texts), 2).copy()

    def cluster(self, keys: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(keys).view(np.dtype((np.void, keys.dtype.itemsize * keys.shape[1]))).ravel()
        _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
        return first[inverse.ravel()].astype(np.int64)
