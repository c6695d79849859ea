"""Exact repeated substrings across a corpus with a suffix array (Lee et al. 2022, "Deduplicating Training Data
Makes Language Models Better", §3 ExactSubstr): which byte spans of each document repeat an earlier occurrence.

The documents' UTF-8 bytes are laid end to end, each followed by a separator symbol that occurs nowhere else
(256 + document number), so no match crosses a document. For every position i, `later_repeats` gives the longest
common prefix of suffix i with any earlier suffix j < i (and that j). A byte is cut when it lies in some
[i, i + length[i]) with length[i] >= `min_length`: exactly the later occurrences of every substring of at least
`min_length` bytes that occurs more than once, while the first occurrence in corpus order is kept. A character is cut
only when all its bytes are, so the text left is valid UTF-8.

Two implementations that agree exactly: C++ (`engine.data.curation._suffix_array`, built by `pip install -e .`) and
NumPy, used when the extension is not built (with one warning).

Memory, per input byte, beside the input itself: the C++ path (SA-IS, then Kasai's LCP) peaks at 28 bytes (measured
as the peak RSS over 10 MB of text; int32 symbols, suffix array, LCP, inverse suffix array, the two int32 outputs),
budgeted as 32; the NumPy path needs about 16 + 4 log2(n) (one int32 rank array per doubling round for the LCP, int64
sort keys). Inputs over the budget are cut into chunks of whole documents (`chunks`); repeats across two chunks are
not found.
"""

import functools
import importlib
import types
import warnings

import numpy as np

SEPARATOR_BASE = 256  # symbols 0..255 are bytes; document k's separator is 256 + k
CPP_BYTES_PER_INPUT_BYTE = 32  # measured peak 28 (module docstring)
NUMPY_BYTES_PER_INPUT_BYTE = 16 + 4 * 32  # log2(n) <= 32 rank arrays
_IMPLS = ("auto", "cpp", "numpy")


@functools.cache
def _load_extension() -> types.ModuleType | str:
    """The compiled module, or why it does not import."""
    try:
        return importlib.import_module("engine.data.curation._suffix_array")
    except ImportError as e:
        return str(e)


def cpp_available() -> bool:
    """Whether the C++ extension imports."""
    return not isinstance(_load_extension(), str)


@functools.cache
def _warn_numpy_fallback(why: str) -> None:
    warnings.warn(
        f"engine.data.curation._suffix_array is not built ({why}); using the slower NumPy suffix array. "
        "Build it with `pip install -e .` or `python setup.py build_ext --inplace`.",
        RuntimeWarning,
        stacklevel=4,
    )


def _choose(impl: str) -> types.ModuleType | None:
    """The C++ module for 'cpp' (an error when not built) and 'auto' (None, warning once, when not built)."""
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {', '.join(_IMPLS)}, got {impl!r}")
    ext = _load_extension() if impl != "numpy" else None
    if isinstance(ext, str):
        if impl == "cpp":
            raise ImportError(f"impl='cpp' but engine.data.curation._suffix_array is not built ({ext}); "
                              "run `pip install -e .`")  # fmt: skip
        _warn_numpy_fallback(ext)
        return None
    return ext


def corpus_symbols(data: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int32 symbols, start of each document in them): the bytes of documents with `lengths` laid end to end in
    `data`, each document followed by its own separator."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n_docs = len(lengths)
    ends = np.cumsum(lengths + 1)  # one past each separator
    starts = ends - lengths - 1
    symbols = np.empty(int(ends[-1]) if n_docs else 0, dtype=np.int32)
    is_byte = np.ones(len(symbols), dtype=bool)
    is_byte[ends - 1] = False
    symbols[is_byte] = data
    symbols[ends - 1] = SEPARATOR_BASE + np.arange(n_docs, dtype=np.int32)
    return symbols, starts


# ----------------------------------------------------------------------------------------------------------------
# NumPy implementation


def _suffix_array_numpy(symbols: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(suffix array, ranks per round): prefix doubling with argsort; ranks[t][i] orders the length-2^t prefixes of
    suffix i (a suffix that ends sorts first), so equal ranks at round t mean 2^t equal symbols."""
    n = len(symbols)
    _, rank = np.unique(symbols, return_inverse=True)
    rank = rank.astype(np.int64).ravel()
    levels = [rank.astype(np.int32)]
    sa = np.argsort(rank, kind="stable")
    k = 1
    while n and levels[-1][sa[-1]] < n - 1:
        second = np.full(n, -1, dtype=np.int64)
        second[: n - k] = rank[k:]
        key = rank * (n + 1) + (second + 1)
        sa = np.argsort(key, kind="stable")
        sorted_key = key[sa]
        rank = np.empty(n, dtype=np.int64)
        rank[sa] = np.concatenate([[0], np.cumsum(sorted_key[1:] != sorted_key[:-1])])
        levels.append(rank.astype(np.int32))
        k *= 2
    return sa, levels


def _lcp_numpy(sa: np.ndarray, levels: list[np.ndarray]) -> np.ndarray:
    """lcp[r] = LCP(sa[r - 1], sa[r]) by binary lifting over the rounds' ranks (largest power of two first)."""
    n = len(sa)
    lcp = np.zeros(n, dtype=np.int64)
    if n < 2:
        return lcp
    a, b = sa[:-1].astype(np.int64), sa[1:].astype(np.int64)
    h = np.zeros(n - 1, dtype=np.int64)
    for t in range(len(levels) - 1, -1, -1):
        ia, ib = a + h, b + h
        ok = (ia < n) & (ib < n)
        ok[ok] = levels[t][ia[ok]] == levels[t][ib[ok]]
        h[ok] += 1 << t
    lcp[1:] = h
    return lcp


def _sparse_min(values: np.ndarray) -> np.ndarray:
    """table[t, i] = min(values[i : i + 2^t]) (padded with the maximum beyond the end)."""
    n = len(values)
    table = [values]
    span = 1
    while 2 * span <= n:
        prev = table[-1]
        table.append(np.minimum(prev[:-span], prev[span:]))
        span *= 2
    out = np.full((len(table), n), np.iinfo(np.int64).max, dtype=np.int64)
    for t, row in enumerate(table):
        out[t, : len(row)] = row
    return out


def _nearest_smaller_numpy(sa: np.ndarray, lcp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each slot r: the nearest slot before r with a smaller position (-1 if none) and the LCP with it."""
    n = len(sa)
    sa_min = _sparse_min(sa.astype(np.int64))
    lcp_min = _sparse_min(lcp)
    slot = np.arange(n, dtype=np.int64)
    edge = slot.copy()  # the block [edge, slot) has positions all larger than sa[slot]
    for t in range(len(sa_min) - 1, -1, -1):
        cand = edge - (1 << t)
        ok = cand >= 0
        ok[ok] = sa_min[t, cand[ok]] > sa[slot[ok]]
        edge[ok] = cand[ok]
    prev = edge - 1
    run = np.zeros(n, dtype=np.int64)
    has = prev >= 0
    lo, hi = prev[has] + 1, slot[has]  # LCP(prev, r) = min lcp[prev + 1 .. r]
    t = np.floor(np.log2(hi - lo + 1)).astype(np.int64)
    run[has] = np.minimum(lcp_min[t, lo], lcp_min[t, hi - (1 << t) + 1])
    return prev, run


def _later_repeats_numpy(symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(symbols)
    if n == 0:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32)
    sa, levels = _suffix_array_numpy(symbols)
    lcp = _lcp_numpy(sa, levels)
    del levels
    prev, run_prev = _nearest_smaller_numpy(sa, lcp)
    # the other side: walk the suffix array backwards (slot r -> n - 1 - r; lcp shifts by one)
    nxt, run_next = _nearest_smaller_numpy(sa[::-1].copy(), np.concatenate([[0], lcp[:0:-1]]))
    nxt = np.where(nxt >= 0, n - 1 - nxt, -1)[::-1]
    run_next = run_next[::-1]
    src_prev = np.where(prev >= 0, sa[np.maximum(prev, 0)], -1)
    src_next = np.where(nxt >= 0, sa[np.maximum(nxt, 0)], -1)
    take_next = (run_next > run_prev) | ((run_next == run_prev) & (src_next < src_prev))
    run = np.where(take_next, run_next, run_prev)
    src = np.where(take_next, src_next, src_prev)
    src = np.where(run > 0, src, -1)
    length, source = np.zeros(n, dtype=np.int32), np.full(n, -1, dtype=np.int32)
    length[sa], source[sa] = run, src
    return length, source


def later_repeats(symbols: np.ndarray, impl: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(length, source), int32: for each position i the longest common prefix of suffix i with any suffix j < i, and
    that j (-1 when length is 0; ties go to the smaller j of the two nearest candidates)."""
    symbols = np.ascontiguousarray(symbols, dtype=np.int32)
    ext = _choose(impl)
    if ext is None:
        return _later_repeats_numpy(symbols)
    alphabet = int(symbols.max()) + 1 if len(symbols) else 1
    return ext.later_repeats(symbols, alphabet)


# ----------------------------------------------------------------------------------------------------------------
# from repeats to cuts


def repeated_mask(
    data: np.ndarray, lengths: np.ndarray, min_length: int, impl: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """(mask, source): a bool per byte of `data` (documents of `lengths` laid end to end), True where the byte belongs
    to a later occurrence of a substring of >= `min_length` bytes seen earlier, narrowed to whole characters (a
    character is cut only when all its bytes are); and per document, the earlier document its first `min_length`
    bytes repeat (-1 when they repeat nothing)."""
    symbols, starts = corpus_symbols(data, lengths)
    n = len(symbols)
    length, source = later_repeats(symbols, impl)
    del symbols  # int32 from here on (n < 2^31): at most 4 arrays of 4 bytes per byte beside the input
    first = np.full(len(starts), -1, dtype=np.int64)
    if len(starts):
        head = length[starts] >= min_length
        first[head] = np.searchsorted(starts, source[starts[head]], side="right") - 1
    del source
    pos = np.arange(n, dtype=np.int32)
    reach = length + pos  # end of the repeat at each position; only those of >= min_length count
    reach[length < min_length] = 0
    del length
    np.maximum.accumulate(reach, out=reach)
    covered = reach > pos
    del reach, pos
    is_byte = np.ones(n, dtype=bool)
    is_byte[starts + np.asarray(lengths, dtype=np.int64)] = False
    covered = covered[is_byte]
    if not len(covered):
        return covered, first
    lead = (np.asarray(data, dtype=np.uint8) & 0xC0) != 0x80  # UTF-8: continuation bytes are 10xxxxxx
    char_of = np.cumsum(lead) - 1
    char_starts = np.flatnonzero(lead)
    if len(char_starts) == 0 or char_starts[0] != 0:  # stray continuation bytes at the start: a character of their own
        char_starts = np.concatenate([[0], char_starts])
        char_of += 1
    whole = np.minimum.reduceat(covered.astype(np.uint8), char_starts).astype(bool)
    return whole[char_of], first


def chunks(lengths: np.ndarray, max_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of documents whose bytes sum to at most `max_bytes` (a longer document on its own)."""
    out, start, total = [], 0, 0
    for k, size in enumerate(np.asarray(lengths, dtype=np.int64).tolist()):
        if k > start and total + size + 1 > max_bytes:
            out.append((start, k))
            start, total = k, 0
        total += size + 1
    if start < len(lengths):
        out.append((start, len(lengths)))
    return out
