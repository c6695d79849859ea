"""Megatron-LM indexed datasets: `PREFIX.bin` (token arrays) and `PREFIX.idx` (the `MMIDIDX` v1 index).

Byte layout of `.idx` (little-endian; Megatron-LM, Shoeybi et al. 2019, `megatron/core/datasets/indexed_dataset.py`;
docs/contracts.md, "Data format"), so files written by Megatron's builder read here and ours read there:

    magic b"MMIDIDX\\x00\\x00" (9 B) | version u64 = 1 | dtype code u8 | sequence_count u64 | document_count u64
    | int32 sequence_lengths[S] | int64 sequence_pointers[S] (byte offsets into .bin) | int64 document_indices[D]
    | optional int8 sequence_modes[S] (multimodal datasets)

`document_indices` starts at 0 and gets `len(sequence_lengths)` appended at each end of document, so D = docs + 1.
The reader memory-maps both files and returns zero-copy views; the builder writes under temporary names and renames
at `finalize()`, so an interrupted build never leaves a `PREFIX.idx` that points at a half-written `.bin`.
"""

import mmap
import os
import shutil
import struct
from array import array
from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import DTypeLike

from engine.data._files import fsync_dir, lock_temp, remove_quietly, remove_stale_temps, temp_path

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # 9 magic + 8 version + 1 dtype code + 8 sequence count + 8 document count
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A `.bin`/`.idx` pair that is malformed, truncated or inconsistent (the message names the file)."""


def idx_path(prefix: str) -> str:
    """PREFIX.idx: the index file of a dataset prefix."""
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    """PREFIX.bin: the token file of a dataset prefix."""
    return prefix + ".bin"


def optimal_dtype(vocab_size: int | None) -> type:
    """Megatron's choice of token dtype: uint16 when every id fits below 65500, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def dtype_code(dtype: DTypeLike) -> int:
    """The `.idx` dtype code of a NumPy dtype (ValueError for dtypes the format cannot store)."""
    try:
        return _CODE_OF[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {dtype!r} cannot be stored in an indexed dataset (allowed: {_allowed()})") from None


def _allowed() -> str:
    return ", ".join(np.dtype(t).name for t in DTYPE_CODES.values())


def _map(path: str) -> mmap.mmap | bytes:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""  # mmap refuses empty files; an empty dataset has an empty .bin
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class IndexedDataset:
    """Read-only view of a Megatron indexed dataset; `ds[i]` is sequence i as a zero-copy NumPy array.

    Megatron's builders write one sequence per document unless told otherwise, so for text corpora
    `len(ds)` is the number of documents. Picklable (reopens the files), so DataLoader workers can hold one.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = str(prefix)
        self._open()

    def _open(self) -> None:
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        missing = [p for p in (ipath, bpath) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{' and '.join(missing)}: not found (indexed dataset prefix {self.prefix!r})")
        self._idx = _map(ipath)
        size = len(self._idx)
        if size < HEADER_SIZE:
            raise IndexedDatasetError(f"{ipath}: truncated header ({size} bytes, the header alone is {HEADER_SIZE})")
        magic = bytes(self._idx[:9])
        if magic != MAGIC:
            raise IndexedDatasetError(f"{ipath}: wrong magic {magic!r}, expected {MAGIC!r} (not a Megatron .idx)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", self._idx[9:HEADER_SIZE])
        if version != VERSION:
            raise IndexedDatasetError(f"{ipath}: unsupported version {version} (only version {VERSION} exists)")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{ipath}: unknown dtype code {code} (known codes: 1..8)")
        self._dtype = np.dtype(DTYPE_CODES[code])
        need = HEADER_SIZE + 12 * n_seq + 8 * n_doc
        if size < need:
            raise IndexedDatasetError(
                f"{ipath}: truncated ({size} bytes, the header's {n_seq} sequences and {n_doc} documents need {need})"
            )
        if size not in (need, need + n_seq):  # need + n_seq: Megatron's multimodal files carry int8 sequence modes
            raise IndexedDatasetError(
                f"{ipath}: size {size} bytes does not match the header ({n_seq} sequences, {n_doc} documents "
                f"need {need}, or {need + n_seq} with sequence modes)"
            )
        off = HEADER_SIZE
        self._lengths = np.frombuffer(self._idx, np.int32, n_seq, off)
        self._pointers = np.frombuffer(self._idx, np.int64, n_seq, off + 4 * n_seq)
        self._doc_idx = np.frombuffer(self._idx, np.int64, n_doc, off + 12 * n_seq)
        self._modes = np.frombuffer(self._idx, np.int8, n_seq, need) if size > need else None
        if n_doc and (self._doc_idx[0] != 0 or self._doc_idx[-1] > n_seq):
            raise IndexedDatasetError(
                f"{ipath}: document indices must start at 0 and end at most at the sequence count {n_seq}, "
                f"got {int(self._doc_idx[0])}..{int(self._doc_idx[-1])}"
            )

        self._bin = _map(bpath)
        end = int(self._pointers[-1]) + int(self._lengths[-1]) * self._dtype.itemsize if n_seq else 0
        if len(self._bin) < end:
            raise IndexedDatasetError(
                f"{bpath}: truncated ({len(self._bin)} bytes, the index points up to byte {end}; "
                f"{ipath} belongs to a longer .bin)"
            )

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self._lengths)

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}, sequences={len(self)}, dtype={self._dtype.name})"

    def _check_index(self, i: int) -> int:
        n = len(self._lengths)
        j = int(i) + n if i < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences in {self.prefix}")
        return j

    def __getitem__(self, i: int | np.integer | slice) -> np.ndarray | list[np.ndarray]:
        """Sequence i (zero-copy, read-only), or a list of them for a contiguous slice (as Megatron's reader)."""
        if isinstance(i, (int, np.integer)):
            j = self._check_index(i)
            return np.frombuffer(self._bin, self._dtype, int(self._lengths[j]), int(self._pointers[j]))
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise ValueError("slices of an IndexedDataset must be contiguous (step 1)")
            if start >= stop:
                return []
            lengths = self._lengths[start:stop]
            flat = np.frombuffer(self._bin, self._dtype, int(lengths.sum(dtype=np.int64)), int(self._pointers[start]))
            return np.split(flat, np.cumsum(lengths[:-1], dtype=np.int64))
        raise TypeError(f"IndexedDataset indices must be integers or slices, not {type(i).__name__}")

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i (to its end when length is None), zero-copy."""
        j = self._check_index(i)
        n = int(self._lengths[j])
        if length is None:
            length = n - offset
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} of length {n}")
        return np.frombuffer(self._bin, self._dtype, length, int(self._pointers[j]) + offset * self._dtype.itemsize)

    @property
    def dtype(self) -> np.dtype:
        """Token dtype of the .bin (from the .idx header)."""
        return self._dtype

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32 [S]: tokens per sequence."""
        return self._lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """int64 [S]: byte offset of each sequence in the .bin."""
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64 [D]: sequence index where each document starts, plus the end ([0, ..., S] for whole documents)."""
        return self._doc_idx

    @property
    def sequence_modes(self) -> np.ndarray | None:
        """int8 [S] per-sequence modes of Megatron's multimodal files, None otherwise."""
        return self._modes

    @property
    def num_tokens(self) -> int:
        """Total tokens over all sequences."""
        return int(self._lengths.sum(dtype=np.int64))

    @property
    def num_documents(self) -> int:
        """Documents (a document may span several sequences)."""
        return max(len(self._doc_idx) - 1, 0)

    @staticmethod
    def exists(prefix: str) -> bool:
        """Whether both PREFIX.idx and PREFIX.bin exist (says nothing of their validity)."""
        return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


class IndexedDatasetBuilder:
    """Writes PREFIX.bin / PREFIX.idx. Tokens stream to a temporary .bin; `finalize()` writes the index and
    renames both into place (the .idx last), so readers never see a PREFIX.idx without its complete .bin.

    Used as a context manager it finalizes on success and removes its temporary files on an exception.
    """

    def __init__(self, prefix: str, dtype: DTypeLike = None, *, vocab_size: int | None = None) -> None:
        if dtype is None:
            dtype = optimal_dtype(vocab_size) if vocab_size is not None else np.uint16
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)
        if vocab_size is not None and self.dtype.kind in "iu" and vocab_size - 1 > np.iinfo(self.dtype).max:
            raise ValueError(f"dtype {self.dtype.name} cannot hold token ids of a vocabulary of {vocab_size}")
        self.prefix = str(prefix)
        os.makedirs(os.path.dirname(os.path.abspath(self.prefix)), exist_ok=True)
        for final in (bin_path(self.prefix), idx_path(self.prefix)):
            remove_stale_temps(final)
        self._tmp_bin = temp_path(bin_path(self.prefix))
        self._tmp_idx = temp_path(idx_path(self.prefix))
        self._file = open(self._tmp_bin, "wb")  # noqa: SIM115 (closed in finalize/abort)
        lock_temp(self._file)
        self._lengths = array("i")  # int32, as in the file
        self._doc_idx = array("q", [0])
        self._done = False
        self.num_tokens = 0

    def _as_tokens(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        arr = np.asarray(tokens.numpy() if hasattr(tokens, "numpy") else tokens)  # numpy() for torch tensors
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.size == 0 or arr.dtype == self.dtype:
            return arr.astype(self.dtype, copy=False)
        if self.dtype.kind in "iu":
            if arr.dtype.kind not in "iub":
                raise ValueError(f"{self.prefix}: tokens of dtype {arr.dtype} cannot be stored as {self.dtype.name}")
            info = np.iinfo(self.dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                bad = lo if lo < info.min else hi
                raise ValueError(f"{self.prefix}: token id {bad} does not fit in dtype {self.dtype.name}")
        return arr.astype(self.dtype)

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Appends one sequence (the document stays open until `end_document()`)."""
        if self._done:
            raise RuntimeError(f"{self.prefix}: builder already finalized or aborted")
        arr = self._as_tokens(tokens)
        self._file.write(np.ascontiguousarray(arr).tobytes())
        self._lengths.append(arr.size)
        self.num_tokens += arr.size

    def end_document(self) -> None:
        """Marks the end of the current document (after one or more `add_item` calls)."""
        self._doc_idx.append(len(self._lengths))

    def add_document(self, tokens: Sequence[int] | np.ndarray, lengths: Iterable[int] | None = None) -> None:
        """Appends a whole document: one sequence, or several when `lengths` (Megatron's argument) splits it."""
        if lengths is None:
            self.add_item(tokens)
        else:
            arr = self._as_tokens(tokens)
            lengths = [int(n) for n in lengths]
            if sum(lengths) != arr.size:
                raise ValueError(f"{self.prefix}: lengths sum to {sum(lengths)} but the document has {arr.size} tokens")
            for part in np.split(arr, np.cumsum(lengths[:-1])) if lengths else []:
                self.add_item(part)
        self.end_document()

    def add_index(self, prefix: str) -> None:
        """Appends a whole existing dataset (same dtype): how per-worker partial outputs are merged."""
        ds = IndexedDataset(prefix)
        if ds.dtype != self.dtype:
            raise ValueError(f"{idx_path(prefix)}: dtype {ds.dtype.name} differs from the builder's {self.dtype.name}")
        if ds.sequence_modes is not None:
            raise ValueError(f"{idx_path(prefix)}: multimodal datasets (sequence modes) cannot be merged here")
        base = len(self._lengths)
        self._lengths.extend(ds.sequence_lengths.tolist())
        self._doc_idx.extend((ds.document_indices[1:] + base).tolist())
        self.num_tokens += ds.num_tokens
        self._file.flush()
        with open(bin_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._file, 1 << 24)

    def finalize(self) -> str:
        """Writes the index and moves both files into place; returns the prefix."""
        if self._done:
            raise RuntimeError(f"{self.prefix}: builder already finalized or aborted")
        self._done = True
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            lengths = np.frombuffer(self._lengths, np.int32) if len(self._lengths) else np.zeros(0, np.int32)
            pointers = np.zeros(len(lengths), np.int64)
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
            doc_idx = np.frombuffer(self._doc_idx, np.int64)
            with open(self._tmp_idx, "wb") as f:
                lock_temp(f)
                f.write(MAGIC)
                f.write(struct.pack("<QBQQ", VERSION, dtype_code(self.dtype), len(lengths), len(doc_idx)))
                f.write(lengths.tobytes())
                f.write(pointers.tobytes())
                f.write(doc_idx.tobytes())
                f.flush()
                os.fsync(f.fileno())
                # Renamed while both are open, so their locks keep `remove_stale_temps` off them until they are in
                # place. Old index first: between the renames there is no PREFIX.idx pairing with the wrong .bin.
                remove_quietly(idx_path(self.prefix))
                os.replace(self._tmp_bin, bin_path(self.prefix))
                os.replace(self._tmp_idx, idx_path(self.prefix))
            self._file.close()
            fsync_dir(self.prefix)
        except BaseException:
            self._cleanup()
            raise
        return self.prefix

    def _cleanup(self) -> None:
        if not self._file.closed:
            self._file.close()
        remove_quietly(self._tmp_bin, self._tmp_idx)

    def abort(self) -> None:
        """Discards everything written so far (no file appears under the prefix)."""
        self._done = True
        self._cleanup()

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._done:
            self.finalize()
        elif not self._done:
            self.abort()

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            try:
                self.abort()
            except Exception:  # noqa: S110 (interpreter shutdown: nothing sensible to report)
                pass


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> str:
    """Concatenates datasets (in order, same dtype) into one at `output_prefix`."""
    if not prefixes:
        raise ValueError("merge_datasets needs at least one input prefix")
    dtype = IndexedDataset(prefixes[0]).dtype
    with IndexedDatasetBuilder(output_prefix, dtype) as builder:
        for p in prefixes:
            builder.add_index(p)
    return output_prefix


__all__ = [
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "IndexedDatasetError",
    "merge_datasets",
    "optimal_dtype",
    "dtype_code",
    "idx_path",
    "bin_path",
]
