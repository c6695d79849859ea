"""Exact and MinHash dedup: hashing arithmetic, clustering (first document kept, transitive clusters), and the LSH
removal rate of planted near-duplicate pairs against the S-curve P(s) = 1 - (1 - s^r)^b."""

import random
import string

import numpy as np
import pytest

from engine.data.curation.exact_dedup import ExactDedup
from engine.data.curation.minhash import (
    NO_SIGNATURE,
    MinHashDedup,
    lsh_match_probability,
    normalized_words,
    shingle_hashes,
    universal_hash,
)
from engine.data.curation.steps import CurationError, make_step
from engine.data.curation.union_find import first_of_components

P61 = (1 << 61) - 1


def test_exact_dedup_keeps_the_first_copy():
    texts = ["a", "b", "a", "c", "b", "a", "a "]
    step = ExactDedup()
    assert step.cluster(step.keys(texts)).tolist() == [0, 1, 0, 3, 1, 0, 6]


def test_union_find_roots_are_the_first_member():
    # chain 5-3, 3-1 and a separate pair 4-2: clusters {1,3,5} and {2,4}
    roots = first_of_components(6, np.array([5, 3, 4]), np.array([3, 1, 2]))
    assert roots.tolist() == [0, 1, 2, 1, 2, 1]
    roots = first_of_components(6, np.array([1, 3, 2]), np.array([3, 5, 4]))  # edges from the smaller side
    assert roots.tolist() == [0, 1, 2, 1, 2, 1]


def test_universal_hash_is_exact():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, P61, (2, 64), dtype=np.uint64)
    x = rng.integers(0, P61, (50, 1), dtype=np.uint64)
    a[:2], b[:2], x[:2] = P61 - 1, P61 - 1, P61 - 1  # the largest operands
    got = universal_hash(x, a, b)
    assert [[int(g) for g in row] for row in got] == [
        [(int(ai) * int(xi) + int(bi)) % P61 for ai, bi in zip(a, b)] for xi in x[:, 0]
    ]


def test_signature_matches_a_scalar_minhash():
    step = MinHashDedup(bands=2, rows=3)
    shingles = shingle_hashes(normalized_words("One two three four five six seven, eight!"), 5)
    assert len(shingles) == 4
    expected = [min((int(a) * (int(s) % P61) + int(b)) % P61 for s in shingles) for a, b in zip(step._a, step._b)]
    assert step.signatures([shingles])[0].tolist() == expected


def test_normalisation_and_short_documents():
    assert normalized_words("Café, CAFE 2024!") == ["cafe", "cafe", "0"]
    assert shingle_hashes(list("abcde"), 5) != shingle_hashes(list("edcba"), 5)  # a shingle is ordered
    assert len(shingle_hashes(list("abcdeabcde"), 5)) == 5  # distinct shingles only
    step = MinHashDedup()
    keys = step.keys(["too short", "also too short", "five words are just enough"])
    assert (keys[:2] == NO_SIGNATURE).all() and (keys[2] != NO_SIGNATURE).all()
    assert step.cluster(keys).tolist() == [0, 1, 2]  # signature-less documents never cluster


def test_bad_minhash_parameters():
    with pytest.raises(CurationError, match="bands must be a positive integer"):
        make_step("minhash_dedup", {"bands": 0})


def vocabulary(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choices(string.ascii_lowercase, k=8)) for _ in range(n)]


def planted_pair(rng: random.Random, n_words: int, changed: int) -> tuple[str, str]:
    """Two texts of distinct words; the second replaces the last `changed` words. Their 5-gram sets have
    Jaccard (n - c - 4) / (n + c - 4)."""
    words = vocabulary(rng, n_words + changed)
    return " ".join(words[:n_words]), " ".join(words[: n_words - changed] + words[n_words:])


def within(observed: float, p: float, n: int, sigmas: float = 4.0) -> bool:
    """`observed` (a fraction of n Bernoulli(p) trials) is within `sigmas` binomial standard deviations of p."""
    return abs(observed - p) <= sigmas * np.sqrt(p * (1 - p) / n) + 1 / n


@pytest.mark.parametrize("changed", [12, 22, 31])  # Jaccard 0.885, 0.802, 0.732 for 204 words
def test_minhash_removes_planted_pairs_at_the_s_curve_rate(changed):
    rng = random.Random(changed)
    n_words, pairs = 204, 150
    jaccard = (n_words - changed - 4) / (n_words + changed - 4)
    texts = [t for _ in range(pairs) for t in planted_pair(rng, n_words, changed)]
    step = MinHashDedup()
    keys = step.keys(texts)
    # each hash agrees with probability s, all 8 rows of a band with probability s^8
    agree = keys[0::2] == keys[1::2]
    assert within(agree.mean(), jaccard, agree.size)
    bands = agree.reshape(pairs, 14, 8).all(axis=2)
    assert within(bands.mean(), jaccard**8, bands.size)
    first = step.cluster(keys)
    assert (first[0::2] == np.arange(0, 2 * pairs, 2)).all()  # the first of a pair is always kept
    removed = first[1::2] == np.arange(0, 2 * pairs, 2)  # the second is removed as a copy of its own first
    assert ((first[1::2] == np.arange(1, 2 * pairs, 2)) | removed).all()  # and never matched to another pair
    assert (removed == bands.any(axis=1)).all()  # removed exactly when a band collides
    p = float(lsh_match_probability(jaccard, 14, 8))
    assert within(removed.mean(), p, pairs), (jaccard, removed.mean(), p)


def test_s_curve_values():
    np.testing.assert_allclose(lsh_match_probability([0.7, 0.8, 0.85], 14, 8), [0.5645, 0.9235, 0.9884], atol=1e-4)


def test_a_cluster_keeps_its_first_document():
    rng = random.Random(7)
    base = vocabulary(rng, 300)
    near = [" ".join(base[:-i] + vocabulary(rng, i)) for i in (3, 6)]  # both ~0.97 similar to the base
    other = " ".join(vocabulary(rng, 300))
    texts = [other, near[0], " ".join(base), near[1]]
    step = MinHashDedup()
    assert step.cluster(step.keys(texts)).tolist() == [0, 1, 1, 1]


def test_make_step_finds_builtin_steps_without_the_pipeline_imported():
    """The built-in steps register on import; `make_step` imports them itself (a fresh interpreter, where nothing
    imported the pipeline module first)."""
    import subprocess
    import sys

    code = "from engine.data.curation.steps import make_step; print(type(make_step('gopher_repetition')).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "GopherRepetitionFilter", out.stderr[-500:]
