"""Sample-index and blending-index builders: C++ (`engine.data._helpers`) with NumPy fallbacks.

Semantics are Megatron-LM's `helpers.cpp` (Shoeybi et al. 2019; Megatron-Core's `megatron/core/datasets`):

- `build_sample_idx` lays the documents of `document_idx` end to end as one token stream and cuts it into samples
  of `seq_length + extra` tokens, consecutive samples overlapping by `extra` (the label shift). Row k of the result
  is where sample k starts: (position in `document_idx`, token offset in that document); row k + 1 is where it ends.
- `build_blending_indices` interleaves datasets deterministically: sample i goes to the dataset d maximising
  `weights[d] * max(i, 1) - drawn[d]` (the first such d on ties), so every prefix tracks the weights to within
  about one sample per dataset.

The dispatchers `build_sample_idx` / `build_blending_indices` take `impl="auto" | "cpp" | "numpy"`; "auto" uses the
C++ extension when it imports (built by `pip install -e .` or `python setup.py build_ext --inplace`) and otherwise
warns once and uses NumPy. Both implementations return identical arrays (tests/data/test_helpers.py).
"""

import functools
import importlib
import types
import warnings

import numpy as np

_INT32_MAX = np.iinfo(np.int32).max
_IMPLS = ("auto", "cpp", "numpy")


@functools.cache
def _extension() -> types.ModuleType | None:
    """The compiled extension, or None (with one warning per process) when it was not built."""
    try:
        ext = importlib.import_module("engine.data._helpers")
    except ImportError as e:
        warnings.warn(
            f"engine.data._helpers is not built ({e}); using the slower NumPy index builders. "
            "Build it with `pip install -e .` or `python setup.py build_ext --inplace`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return ext


def cpp_available() -> bool:
    """Whether the C++ extension imports."""
    return _extension() is not None


def _choose(impl: str) -> types.ModuleType | None:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {', '.join(_IMPLS)}, got {impl!r}")
    if impl == "numpy":
        return None
    ext = _extension()
    if ext is None and impl == "cpp":
        raise ImportError("impl='cpp' but engine.data._helpers is not built; run `python setup.py build_ext --inplace`")
    return ext


# ----------------------------------------------------------------------------------------------------------------
# build_sample_idx


def _num_samples(total_tokens: int, seq_length: int, extra: int, drop_last: bool) -> int:
    usable = total_tokens - extra
    return usable // seq_length if drop_last else -(-usable // seq_length)


def _check_sample_args(
    sizes: np.ndarray, document_idx: np.ndarray, seq_length: int, num_epochs: int, tokens_per_epoch: int, extra: int
) -> None:
    if seq_length < 1:
        raise ValueError("build_sample_idx: seq_length must be >= 1")
    if num_epochs < 1:
        raise ValueError("build_sample_idx: num_epochs must be >= 1")
    if tokens_per_epoch < 1:
        raise ValueError("build_sample_idx: tokens_per_epoch must be >= 1")
    if extra not in (0, 1):
        raise ValueError("build_sample_idx: add_extra_token_to_sequence must be 0 or 1")
    if sizes.ndim != 1 or document_idx.ndim != 1:
        raise ValueError("build_sample_idx: sizes and document_idx must be 1-D")
    if sizes.dtype != np.int32:
        raise ValueError("build_sample_idx: sizes must be int32")
    if document_idx.dtype not in (np.int32, np.int64):
        raise ValueError("build_sample_idx: document_idx must be int32 or int64")
    if len(document_idx) == 0:
        raise ValueError("build_sample_idx: document_idx is empty")
    if len(sizes) and sizes.min() < 0:
        raise ValueError("build_sample_idx: negative document length in sizes")
    lo, hi = int(document_idx.min()), int(document_idx.max())
    if lo < 0 or hi >= len(sizes):
        bad = int(np.flatnonzero((document_idx < 0) | (document_idx >= len(sizes)))[0])
        raise ValueError(f"build_sample_idx: document_idx entry {bad} is outside sizes ({int(document_idx[bad])})")


def _out_dtype(sizes: np.ndarray, document_idx: np.ndarray) -> type:
    """int32 when every stored value (positions in document_idx, offsets) fits, as Megatron chooses."""
    largest = max(len(document_idx), int(sizes.max()) if len(sizes) else 0)
    return np.int32 if largest <= _INT32_MAX else np.int64


def _sample_idx_setup(
    sizes, document_idx, seq_length: int, num_epochs: int, tokens_per_epoch: int, drop_last: bool, extra: int
) -> tuple[np.ndarray, np.ndarray, int, type, int]:
    """Validated (sizes, document_idx, extra, output dtype, num_samples): the common start of the Python builders."""
    sizes, document_idx, extra = np.asarray(sizes), np.asarray(document_idx), int(extra)
    _check_sample_args(sizes, document_idx, seq_length, num_epochs, tokens_per_epoch, extra)
    num_samples = _num_samples(num_epochs * tokens_per_epoch, seq_length, extra, drop_last)
    return sizes, document_idx, extra, _out_dtype(sizes, document_idx), num_samples


def build_sample_idx_numpy(
    sizes: np.ndarray,
    document_idx: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: int = 1,
) -> np.ndarray:
    """Vectorised `build_sample_idx`: one cumsum and one searchsorted instead of a walk over the documents.

    Sample k + 1 starts at stream position (k + 1) * seq_length; the walk stops in the first document whose end is
    at least (k + 1) * seq_length + extra (a document ending exactly there still holds the extra token), which is
    `searchsorted(doc_ends, target, side="left")`. Empty documents have equal ends and are skipped the same way.
    """
    sizes, document_idx, extra, out_dtype, num_samples = _sample_idx_setup(
        sizes,
        document_idx,
        seq_length,
        num_epochs,
        tokens_per_epoch,
        drop_last_partial_sequence,
        add_extra_token_to_sequence,
    )

    doc_sizes = sizes[document_idx].astype(np.int64)
    doc_ends = np.cumsum(doc_sizes)
    total = int(doc_ends[-1])
    targets = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length + extra
    docs = np.searchsorted(doc_ends, targets, side="left")
    out = np.empty((num_samples + 1, 2), dtype=out_dtype)
    out[0] = 0
    if num_samples == 0:
        return out
    if targets[-1] > total:
        # Out of tokens: only the final, partial sample may run past the end (it then ends at the last document).
        if num_samples >= 2 and targets[-2] > total:
            raise ValueError("build_sample_idx: document_idx holds fewer tokens than num_epochs * tokens_per_epoch")
        last = len(document_idx) - 1
        docs[-1] = last
        out[-1, 1] = doc_sizes[last] - extra
        out[1:-1, 1] = targets[:-1] - extra - (doc_ends[docs[:-1]] - doc_sizes[docs[:-1]])
    else:
        out[1:, 1] = targets - extra - (doc_ends[docs] - doc_sizes[docs])
    out[1:, 0] = docs
    return out


def build_sample_idx_python(
    sizes: np.ndarray,
    document_idx: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: int = 1,
) -> np.ndarray:
    """Plain Python walk over the documents, one sample at a time (the C++ loop, transcribed).

    Reference for tests and the benchmark only: it is ~100x slower than the NumPy version.
    """
    sizes, document_idx, extra, out_dtype, num_samples = _sample_idx_setup(
        sizes,
        document_idx,
        seq_length,
        num_epochs,
        tokens_per_epoch,
        drop_last_partial_sequence,
        add_extra_token_to_sequence,
    )
    size_list = sizes.tolist()
    doc_list = document_idx.tolist()
    last_doc = len(doc_list) - 1
    rows = [(0, 0)]
    doc, offset = 0, 0
    for sample in range(1, num_samples + 1):
        remaining = seq_length + extra
        while remaining != 0:
            doc_len = size_list[doc_list[doc]] - offset
            remaining -= doc_len
            if remaining <= 0:
                offset += remaining + doc_len - extra
                remaining = 0
            elif doc == last_doc:
                if sample != num_samples:
                    raise ValueError(
                        "build_sample_idx: document_idx holds fewer tokens than num_epochs * tokens_per_epoch"
                    )
                offset = size_list[doc_list[doc]] - extra
                break
            else:
                doc += 1
                offset = 0
        rows.append((doc, offset))
    return np.array(rows, dtype=out_dtype).reshape(num_samples + 1, 2)


def build_sample_idx(
    sizes: np.ndarray,
    document_idx: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: int = 1,
    impl: str = "auto",
) -> np.ndarray:
    """[num_samples + 1, 2] sample index (see the module docstring); int32 when every value fits, else int64.

    `sizes` (int32) are the sequence lengths; `document_idx` (int32/int64) the shuffled document order over all
    epochs; `tokens_per_epoch` the tokens in one pass, so num_samples = (num_epochs * tokens_per_epoch - extra) //
    seq_length (rounded up when `drop_last_partial_sequence` is False).
    """
    ext = _choose(impl)
    args = (
        np.ascontiguousarray(sizes),
        np.ascontiguousarray(document_idx),
        int(seq_length),
        int(num_epochs),
        int(tokens_per_epoch),
        bool(drop_last_partial_sequence),
        int(add_extra_token_to_sequence),
    )
    if ext is None:
        return build_sample_idx_numpy(*args)
    return ext.build_sample_idx(*args)


# ----------------------------------------------------------------------------------------------------------------
# build_blending_indices


def _check_blend_args(weights: np.ndarray, size: int) -> None:
    if weights.ndim != 1 or len(weights) == 0:
        raise ValueError("build_blending_indices: weights must be a non-empty 1-D array")
    if len(weights) > np.iinfo(np.int16).max:
        raise ValueError("build_blending_indices: at most 32767 datasets")
    if size < 0:
        raise ValueError("build_blending_indices: size must be >= 0")


def build_blending_indices_numpy(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fallback for `build_blending_indices`: a tight Python loop, not a vectorised one.

    The greedy is inherently sequential: the choice at step i compares absolute deficits w[d]*i - drawn[d], which
    depend on every earlier choice, and it is not a merge of independent per-dataset schedules (that would rank by
    drawn[d]/w[d], a different rule that picks differently). Bit-exact agreement with the C++ (same float64
    operations, same first-index tie rule) rules out closed forms. Cost: O(size * num_datasets) Python steps,
    about 0.5 s per million samples for two datasets.
    """
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    _check_blend_args(weights, size)
    w = weights.tolist()
    n = len(w)
    current = [0] * n
    dataset_index = [0] * size
    dataset_sample_index = [0] * size
    if n == 1:
        return np.zeros(size, dtype=np.int16), np.arange(size, dtype=np.int64)
    others = range(1, n)
    w0 = w[0]
    for i in range(size):
        x = float(i) if i > 1 else 1.0
        best = 0
        best_error = w0 * x - current[0]
        for d in others:
            error = w[d] * x - current[d]
            if error > best_error:
                best_error = error
                best = d
        dataset_index[i] = best
        dataset_sample_index[i] = current[best]
        current[best] += 1
    return np.array(dataset_index, dtype=np.int16), np.array(dataset_sample_index, dtype=np.int64)


def build_blending_indices(weights: np.ndarray, size: int, impl: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16[size], dataset_sample_index int64[size]) by the greedy rule of the module docstring.

    `weights` should be normalised (BlendedDataset does it); sample i of the blend is
    `datasets[dataset_index[i]][dataset_sample_index[i]]`.
    """
    ext = _choose(impl)
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if ext is None:
        return build_blending_indices_numpy(weights, int(size))
    return ext.build_blending_indices(weights, int(size))
