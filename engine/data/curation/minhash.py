"""MinHash LSH near-duplicate dedup (Broder 1997; the configuration of FineWeb, Penedo et al. 2024 §3.4, and
datatrove's `MinhashConfig`: word 5-grams, 14 bands x 8 rows = 112 hashes, seed 1).

Text is normalised (lower case, accents stripped, digits -> 0, punctuation dropped) and cut into word n-grams
(shingles). Each shingle is hashed once to 64 bits; hash i of the signature is min over shingles of
h_i(x) = (a_i x + b_i) mod p, p = 2^61 - 1, a universal permutation family, computed for all shingles and all hashes at
once with exact 122-bit products split into 31-bit limbs (datatrove's uint64 product wraps mod 2^64 instead).
P[h_i(A) = h_i(B)] equals the Jaccard similarity s of the shingle sets, so two documents agree on all r rows of a band
with probability s^r and share at least one of b bands with probability

    P(s) = 1 - (1 - s^r)^b,

an S-curve whose steepest point is near (1/b)^(1/r) (about 0.72 for 14 x 8). Documents that share a band are joined
(union-find, transitively) and each cluster keeps its first document in corpus order. Documents with fewer words than
one shingle have no signature and take no part (datatrove does the same).
"""

import hashlib
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from engine.data.curation.steps import DedupStep, register_step
from engine.data.curation.union_find import first_of_components

MERSENNE_61 = np.uint64((1 << 61) - 1)
NO_SIGNATURE = np.uint64(2**64 - 1)  # marks a document too short to shingle (real hash values are < 2^61 - 1)
_LOW31 = np.uint64((1 << 31) - 1)
_LOW30 = np.uint64((1 << 30) - 1)
_POLY = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier for combining word hashes into an n-gram hash
_WORD_RE = re.compile(r"\w+")
_DIGITS_RE = re.compile(r"\d+")
MAX_BATCH_SHINGLES = 8192  # bounds the (shingles x hashes) work arrays to ~7 MB each


def lsh_match_probability(similarity: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """P(two documents with Jaccard `similarity` share a band) = 1 - (1 - s^rows)^bands."""
    return 1.0 - (1.0 - np.asarray(similarity, dtype=np.float64) ** rows) ** bands


def normalized_words(text: str) -> list[str]:
    """Lower-cased words without accents or punctuation, digit runs replaced by 0 (near-dup recall)."""
    text = text.lower()
    if not text.isascii():  # ASCII has no accents to strip
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    return _WORD_RE.findall(_DIGITS_RE.sub("0", text))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the 64 output bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingle_hashes(words: list[str], n: int) -> np.ndarray:
    """The distinct 64-bit hashes of the word n-grams of `words` (empty when there are fewer than n words). Each word is
    hashed once (BLAKE2b, 64 bits); an n-gram's hash is a polynomial of its word hashes, mixed."""
    if len(words) < n:
        return np.zeros(0, dtype=np.uint64)
    cache: dict[str, int] = {}
    for w in words:
        if w not in cache:
            cache[w] = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
    word_hashes = np.fromiter((cache[w] for w in words), dtype=np.uint64, count=len(words))
    count = len(words) - n + 1
    h = np.zeros(count, dtype=np.uint64)
    for j in range(n):
        h = h * _POLY + word_hashes[j : j + count]  # wraps mod 2^64, as intended
    return np.unique(_mix64(h))


def _mod_mersenne(x: np.ndarray) -> np.ndarray:
    """x mod (2^61 - 1) for x < 2^64 (2^61 = 1 mod p, so fold the top bits down; then one conditional subtraction,
    done as an unsigned minimum: r - p wraps to a huge value exactly when r < p)."""
    r = (x & MERSENNE_61) + (x >> np.uint64(61))
    return np.minimum(r, r - MERSENNE_61)


def universal_hash(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a x + b) mod (2^61 - 1), exactly, broadcasting x (N, 1) against a, b (H,), for x, a, b < 2^61 - 1. The
    122-bit product is split into 31-bit limbs, a = a1 2^31 + a0 and x = x1 2^31 + x0, with 2^61 = 1 (mod p):
    a x = 2 a1 x1 + (a1 x0 + a0 x1) 2^31 + a0 x0, and mid 2^31 = (mid >> 30) 2^61 + (mid mod 2^30) 2^31."""
    a1, a0 = a >> np.uint64(31), a & _LOW31
    x1, x0 = x >> np.uint64(31), x & _LOW31
    mid = a1 * x0
    mid += a0 * x1  # < 2^62
    acc = a1 * x1
    acc <<= np.uint64(1)  # < 2^61
    acc += mid >> np.uint64(30)  # + < 2^32
    mid &= _LOW30
    mid <<= np.uint64(31)
    acc += mid  # + < 2^61
    acc += a0 * x0  # + < 2^62
    acc += b  # + < 2^61: the total stays below 2^64
    return _mod_mersenne(acc)


@register_step
@dataclass
class MinHashDedup(DedupStep):
    """MinHash signatures (`bands` x `rows` hashes over word `ngram`-grams) and LSH banding with union-find."""

    name = "minhash_dedup"
    reason = "near_duplicate"
    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1

    def __post_init__(self) -> None:
        for key in ("ngram", "bands", "rows"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        rng = np.random.default_rng(self.seed)
        p = int(MERSENNE_61)
        self._a = rng.integers(1, p, size=self.bands * self.rows, dtype=np.uint64)
        self._b = rng.integers(0, p, size=self.bands * self.rows, dtype=np.uint64)

    def signatures(self, shingle_sets: list[np.ndarray]) -> np.ndarray:
        """(len(shingle_sets), bands * rows) uint64 minima, NO_SIGNATURE rows for empty sets. Shingles of several
        documents are permuted in one array and reduced per document (np.minimum.reduceat)."""
        out = np.full((len(shingle_sets), self.bands * self.rows), NO_SIGNATURE, dtype=np.uint64)
        i = 0
        while i < len(shingle_sets):
            j, total = i, 0
            while j < len(shingle_sets) and (j == i or total + len(shingle_sets[j]) <= MAX_BATCH_SHINGLES):
                total += len(shingle_sets[j])
                j += 1
            batch = [k for k in range(i, j) if len(shingle_sets[k])]
            if batch:
                x = _mod_mersenne(np.concatenate([shingle_sets[k] for k in batch]))[:, None]
                permuted = universal_hash(x, self._a, self._b)
                starts = np.cumsum([0] + [len(shingle_sets[k]) for k in batch[:-1]])
                out[batch] = np.minimum.reduceat(permuted, starts, axis=0)
            i = j
        return out

    def keys(self, texts: list[str]) -> np.ndarray:
        return self.signatures([shingle_hashes(normalized_words(t), self.ngram) for t in texts])

    def cluster(self, keys: np.ndarray) -> np.ndarray:
        n = len(keys)
        has_sig = np.flatnonzero(keys[:, 0] != NO_SIGNATURE) if n else np.zeros(0, dtype=np.int64)
        lefts, rights = [], []
        for band in range(self.bands):
            rows = np.ascontiguousarray(keys[has_sig, band * self.rows : (band + 1) * self.rows])
            rows = rows.view(np.dtype((np.void, 8 * self.rows))).ravel()
            _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
            first_of = first[inverse.ravel()]
            collide = np.flatnonzero(first_of != np.arange(len(rows)))
            lefts.append(has_sig[collide])
            rights.append(has_sig[first_of[collide]])
        if not lefts:
            return np.arange(n, dtype=np.int64)
        return first_of_components(n, np.concatenate(lefts), np.concatenate(rights))
