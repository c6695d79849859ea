"""GPT pretraining samples: fixed-length windows of `seq_len + 1` tokens over shuffled, concatenated documents.

Megatron-LM's `GPTDataset` (Shoeybi et al. 2019; Megatron-Core's `megatron/core/datasets/gpt_dataset.py`), built
from three index arrays:

- document index: the exposed document ids repeated once per epoch and shuffled with
  `numpy.random.RandomState(seed)`. When the last epoch contributes fewer than 80% of an epoch's samples it is
  shuffled separately ("separate final epoch"), so the partial epoch draws its documents uniformly rather than
  whatever happened to land at the end of one big shuffle.
- sample index: `build_sample_idx` (C++ or NumPy) over that order: sample k is tokens [k*seq_len, (k+1)*seq_len + 1)
  of the concatenated stream, so consecutive samples overlap by the one label token and documents are not padded.
- shuffle index: a permutation of the samples (again split at the final epoch when it was separated).

`ds[k]` reads sample `shuffle_index[k]` and returns `{"tokens": int64[seq_len + 1]}`; the caller takes
`tokens[:-1]` as inputs and `tokens[1:]` as labels. The three arrays are cached as .npy files in `cache_dir`, keyed
by a hash of everything they depend on, written atomically, and memory-mapped when reused.
"""

import hashlib
import json
import os

import numpy as np

from engine.data._files import atomic_write, file_lock
from engine.data.helpers import build_sample_idx
from engine.data.indexed_dataset import IndexedDataset, bin_path, idx_path

# Bump when the index construction changes, so caches written by older code are not reused.
INDEX_VERSION = 1
# Megatron's threshold: a final epoch below this fraction of an epoch's samples is shuffled on its own.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
# .idx files up to this size are hashed whole for the cache key; larger ones are identified by size and mtime.
_HASH_IDX_LIMIT = 256 << 20
# Tokens per chunk of the vocabulary scan (bounded memory on large .bin files).
_RANGE_CHUNK = 1 << 24


class GPTDatasetError(ValueError):
    """Input that cannot make GPT samples (empty data, too short for seq_len, token ids beyond the vocabulary)."""


def _file_identity(prefix: str) -> dict:
    """What identifies the data for caching: a checksum of the .idx (or its size and mtime when huge) and the .bin
    size and mtime (the .bin only matters to the vocabulary check)."""
    ipath, bpath = idx_path(prefix), bin_path(prefix)
    ist, bst = os.stat(ipath), os.stat(bpath)
    if ist.st_size <= _HASH_IDX_LIMIT:
        digest = hashlib.blake2b(digest_size=16)
        with open(ipath, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        idx_id = digest.hexdigest()
    else:
        idx_id = f"{os.path.abspath(ipath)}:{ist.st_size}:{ist.st_mtime_ns}"
    return {"idx": idx_id, "bin": f"{bst.st_size}:{bst.st_mtime_ns}"}


def _token_range(ds: IndexedDataset) -> tuple[int, int]:
    """(min, max) token id over all sequences of `ds`, streamed from the mmap in chunks."""
    n = ds.num_tokens
    if n == 0:
        return 0, 0
    tokens = np.memmap(bin_path(ds.prefix), dtype=ds.dtype, mode="r", offset=int(ds.sequence_pointers[0]), shape=(n,))
    lo, hi = int(tokens[0]), int(tokens[0])
    chunk = _RANGE_CHUNK
    for i in range(0, n, chunk):  # one pass over the file: each chunk is paged in once for both bounds
        part = tokens[i : i + chunk]
        lo, hi = min(lo, int(part.min())), max(hi, int(part.max()))
    del tokens
    return lo, hi


def _hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]


def num_epochs_for(num_samples: int, tokens_per_epoch: int, seq_len: int, extra: int = 1) -> int:
    """Fewest epochs whose tokens cover `num_samples` samples of `seq_len` (+ the extra label token at the end)."""
    needed = num_samples * seq_len + extra
    return max(1, -(-needed // tokens_per_epoch))


def _document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate: bool) -> np.ndarray:
    if separate and num_epochs > 1:
        first = _document_index(documents, num_epochs - 1, rng, False)
        return np.concatenate([first, _document_index(documents, 1, rng, False)])
    dtype = np.int32 if len(documents) * num_epochs <= np.iinfo(np.int32).max else np.int64
    index = np.tile(documents.astype(dtype), num_epochs)
    rng.shuffle(index)
    return index


def _shuffle_index(num_first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_first, dtype=dtype)
    rng.shuffle(first)
    if num_first == total:
        return first
    last = np.arange(num_first, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def build_indices(
    sizes: np.ndarray,
    documents: np.ndarray,
    num_samples: int | None,
    seq_len: int,
    seed: int,
    extra: int = 1,
    impl: str = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document_index, sample_index, shuffle_index) as Megatron's `_build_document_sample_shuffle_indices`.

    `sizes` are the sequence lengths, `documents` the sequence ids this dataset exposes; `num_samples` None means
    one epoch. Deterministic in (sizes, documents, num_samples, seq_len, seed).
    """
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
    num_epochs = 1 if num_samples is None else num_epochs_for(num_samples, tokens_per_epoch, seq_len, extra)
    separate_final_epoch = False
    if num_epochs > 1:
        samples_before_final = ((num_epochs - 1) * tokens_per_epoch - extra) // seq_len
        samples_in_final = num_samples - samples_before_final
        samples_per_epoch = (tokens_per_epoch - extra) // seq_len
        separate_final_epoch = samples_in_final < int(SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch)
    rng = np.random.RandomState(seed)
    document_index = _document_index(documents, num_epochs, rng, separate_final_epoch)
    sample_index = build_sample_idx(
        sizes, document_index, seq_len, num_epochs, tokens_per_epoch, True, extra, impl=impl
    )
    total = len(sample_index) - 1
    shuffle_index = _shuffle_index(samples_before_final if separate_final_epoch else total, total, rng)
    return document_index, sample_index, shuffle_index


class GPTDataset:
    """`ds[k]` -> {"tokens": int64[seq_len + 1]}: sample k of a shuffled, multi-epoch stream of the documents.

    Args:
        indexed_dataset: an `IndexedDataset` or its path prefix.
        num_samples: samples wanted; the number of epochs follows from it. None: one epoch. `len(ds)` is at least
            `num_samples` (the last epoch's whole samples all stay addressable, as in Megatron).
        seq_len: tokens per sample before the extra label token.
        seed: seeds the document and sample shuffles.
        cache_dir: where the index arrays are cached (None: built in memory every time).
        documents: the sequence ids to use (default all), e.g. one split of a dataset.
        split: a name for the split, part of the cache key.
        vocab_size: when given, every token id of the .bin must lie in [0, vocab_size).
        impl: the `build_sample_idx` implementation ("auto", "cpp", "numpy").
    """

    def __init__(
        self,
        indexed_dataset: IndexedDataset | str,
        num_samples: int | None,
        seq_len: int,
        seed: int,
        cache_dir: str | None = None,
        *,
        documents: np.ndarray | None = None,
        split: str = "train",
        vocab_size: int | None = None,
        impl: str = "auto",
    ) -> None:
        ds = indexed_dataset if isinstance(indexed_dataset, IndexedDataset) else IndexedDataset(indexed_dataset)
        self.dataset = ds
        self.prefix = ds.prefix
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.split = split
        self.extra = 1
        if self.seq_len < 1:
            raise GPTDatasetError(f"seq_len must be >= 1, got {seq_len}")
        if num_samples is not None and num_samples < 1:
            raise GPTDatasetError(f"num_samples must be >= 1 (or None for one epoch), got {num_samples}")
        sizes = ds.sequence_lengths
        if documents is None:
            documents = np.arange(len(ds), dtype=np.int64)
        documents = np.asarray(documents, dtype=np.int64)
        if len(documents) and (documents.min() < 0 or documents.max() >= len(ds)):
            raise GPTDatasetError(f"{idx_path(self.prefix)}: documents out of range for {len(ds)} sequences")
        tokens = int(sizes[documents].sum(dtype=np.int64)) if len(documents) else 0
        if tokens == 0:
            raise GPTDatasetError(
                f"{idx_path(self.prefix)}: empty dataset ({len(documents)} documents, 0 tokens); nothing to sample"
            )
        if tokens < self.seq_len + self.extra:
            raise GPTDatasetError(
                f"{idx_path(self.prefix)}: seq_len {self.seq_len} needs {self.seq_len + self.extra} tokens per "
                f"sample but the dataset holds only {tokens}; use a shorter seq_len or more data"
            )
        self.num_samples = num_samples
        self.tokens_per_epoch = tokens
        self.num_epochs = 1 if num_samples is None else num_epochs_for(num_samples, tokens, self.seq_len, self.extra)

        identity = None
        if cache_dir is not None:
            os.makedirs(cache_dir, exist_ok=True)
            identity = _file_identity(self.prefix)
        if vocab_size is not None:
            self._check_vocab(int(vocab_size), cache_dir, identity)
        key = {
            "version": INDEX_VERSION,
            "kind": "GPTDataset",
            "idx": identity["idx"] if identity else None,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "num_samples": num_samples,
            "split": split,
            "extra": self.extra,
            "documents": None
            if len(documents) == len(ds) and np.array_equal(documents, np.arange(len(ds)))
            else hashlib.blake2b(documents.tobytes(), digest_size=16).hexdigest(),
        }
        self.cache_hit = False
        if cache_dir is None:
            self.document_index, self.sample_index, self.shuffle_index = build_indices(
                sizes, documents, num_samples, self.seq_len, self.seed, self.extra, impl
            )
        else:
            self._load_or_build(cache_dir, key, sizes, documents, impl)
        if num_samples is not None and len(self) < num_samples:  # cannot happen with the epoch count above
            raise GPTDatasetError(f"{idx_path(self.prefix)}: built {len(self)} samples, fewer than {num_samples}")

    # -- index arrays ---------------------------------------------------------------------------------------------

    def _load_or_build(self, cache_dir: str, key: dict, sizes, documents, impl: str) -> None:
        base = os.path.join(cache_dir, f"gpt-{_hash(key)}-{self.split}")
        names = ("document_index", "sample_index", "shuffle_index")
        paths = [f"{base}-{n}.npy" for n in names]
        description = f"{base}-description.json"  # written last: its presence marks a complete set

        def complete() -> bool:
            return os.path.isfile(description) and all(os.path.isfile(p) for p in paths)

        if not complete():
            # One process builds while the others (ranks of a job, concurrent jobs) wait and then reuse it.
            with file_lock(f"{base}.lock"):
                if not complete():
                    arrays = build_indices(
                        sizes, documents, self.num_samples, self.seq_len, self.seed, self.extra, impl
                    )
                    for path, array in zip(paths, arrays):
                        with atomic_write(path) as f:
                            np.save(f, array)
                    with atomic_write(description, "w") as f:
                        json.dump({**key, "prefix": os.path.abspath(self.prefix)}, f, indent=1, sort_keys=True)
                    self.document_index, self.sample_index, self.shuffle_index = arrays
                    return
        self.cache_hit = True
        # Plain ndarray views of the mappings (still zero-copy): np.memmap's own __getitem__ doubles the per-sample
        # indexing cost in __getitem__.
        self.document_index, self.sample_index, self.shuffle_index = (
            np.asarray(np.load(p, mmap_mode="r")) for p in paths
        )

    def _check_vocab(self, vocab_size: int, cache_dir: str | None, identity: dict | None) -> None:
        """Every token id in the .bin must be a valid embedding row; the max id is cached beside the indices."""
        bpath = bin_path(self.prefix)
        lo_hi = None
        memo = None
        if cache_dir is not None:
            memo = os.path.join(cache_dir, f"tokens-{_hash({'v': INDEX_VERSION, **identity})}.json")
            if os.path.isfile(memo):
                with open(memo) as f:
                    lo_hi = tuple(json.load(f)["min_max"])
        if lo_hi is None:
            lo_hi = _token_range(self.dataset)
            if memo is not None:
                with atomic_write(memo, "w") as f:
                    json.dump({"min_max": list(lo_hi)}, f)
        lo, hi = lo_hi
        if lo < 0 or hi >= vocab_size:
            bad = hi if hi >= vocab_size else lo
            raise GPTDatasetError(
                f"{bpath}: token id {bad} is outside the vocabulary [0, {vocab_size}); "
                "was it tokenised with a different tokenizer?"
            )

    # -- samples --------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sample_index) - 1

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        if not 0 <= k < len(self):
            raise IndexError(f"sample {k} out of range for a GPTDataset of {len(self)} samples ({self.prefix})")
        i = int(self.shuffle_index[k])
        (doc_begin, offset_begin), (doc_end, offset_end) = self.sample_index[i : i + 2].tolist()
        get = self.dataset.get
        if doc_begin == doc_end:
            tokens = get(int(self.document_index[doc_begin]), offset_begin, offset_end - offset_begin + self.extra)
            return {"tokens": tokens.astype(np.int64)}
        parts = [get(int(self.document_index[doc_begin]), offset_begin)]
        parts += [get(int(d)) for d in self.document_index[doc_begin + 1 : doc_end]]
        parts.append(get(int(self.document_index[doc_end]), 0, offset_end + self.extra))
        return {"tokens": np.concatenate(parts).astype(np.int64, copy=False)}

    def __repr__(self) -> str:
        return (
            f"GPTDataset({self.prefix!r}, samples={len(self)}, seq_len={self.seq_len}, epochs={self.num_epochs}, "
            f"seed={self.seed})"
        )
