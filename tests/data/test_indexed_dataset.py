"""Megatron MMIDIDX v1 compatibility at the byte level, zero-copy reads, atomic builds, merging and bad input."""

import os
import pickle
import struct

import numpy as np
import pytest

from engine.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    merge_datasets,
    optimal_dtype,
)

# Written from Megatron-LM's MMIDIDX v1 layout (docs/contracts.md, "Data format"), independently of the module
# under test.
SPEC_CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}


def spec_write(prefix, sequences, doc_starts, dtype, modes=None):
    """Writes .bin/.idx by hand: sequences (lists of ints), doc_starts = document_indices (0 ... S)."""
    itemsize = np.dtype(dtype).itemsize
    with open(prefix + ".bin", "wb") as f:
        for s in sequences:
            f.write(np.asarray(s, dtype=dtype).tobytes())
    lengths = [len(s) for s in sequences]
    pointers, p = [], 0
    for n in lengths:
        pointers.append(p)
        p += n * itemsize
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", SPEC_CODES[dtype]))
        f.write(struct.pack("<Q", len(sequences)))
        f.write(struct.pack("<Q", len(doc_starts)))
        f.write(struct.pack(f"<{len(lengths)}i", *lengths))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_starts)}q", *doc_starts))
        if modes is not None:
            f.write(struct.pack(f"<{len(modes)}b", *modes))


def spec_parse(prefix):
    """Parses an .idx with struct from the spec; returns (dtype code, lengths, pointers, doc indices, rest)."""
    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    (code,) = struct.unpack_from("<B", raw, 17)
    n_seq, n_doc = struct.unpack_from("<QQ", raw, 18)
    off = 34
    lengths = list(struct.unpack_from(f"<{n_seq}i", raw, off))
    off += 4 * n_seq
    pointers = list(struct.unpack_from(f"<{n_seq}q", raw, off))
    off += 8 * n_seq
    docs = list(struct.unpack_from(f"<{n_doc}q", raw, off))
    off += 8 * n_doc
    return version, code, lengths, pointers, docs, raw[off:]


SEQS = [[1, 2, 3], [65535, 0], [], [7] * 5, [9]]
DOCS = [0, 2, 3, 5]  # document 0 = sequences 0-1, document 1 = sequence 2 (empty), document 2 = sequences 3-4


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8, np.float32])
def test_reads_spec_written_files(tmp_path, dtype):
    prefix = str(tmp_path / "spec")
    seqs = [[min(v, 200) for v in s] for s in SEQS] if dtype == np.uint8 else SEQS
    spec_write(prefix, seqs, DOCS, dtype)
    ds = IndexedDataset(prefix)
    assert len(ds) == len(seqs) and ds.dtype == np.dtype(dtype)
    for i, s in enumerate(seqs):
        assert ds[i].dtype == np.dtype(dtype) and ds[i].tolist() == s
    assert ds[-1].tolist() == seqs[-1]
    assert ds.sequence_lengths.dtype == np.int32 and ds.sequence_lengths.tolist() == [len(s) for s in seqs]
    assert ds.sequence_pointers.dtype == np.int64
    assert ds.document_indices.dtype == np.int64 and ds.document_indices.tolist() == DOCS
    assert ds.num_documents == 3 and ds.num_tokens == sum(map(len, seqs)) and ds.sequence_modes is None
    assert [a.tolist() for a in ds[1:4]] == seqs[1:4]
    assert ds.get(3, offset=1, length=2).tolist() == [7, 7] and ds.get(0, 1).tolist() == seqs[0][1:]


def test_reads_spec_written_multimodal_modes(tmp_path):
    prefix = str(tmp_path / "mm")
    spec_write(prefix, SEQS, DOCS, np.uint16, modes=[0, 1, 0, 2, 1])
    ds = IndexedDataset(prefix)
    assert ds.sequence_modes.tolist() == [0, 1, 0, 2, 1] and ds[3].tolist() == SEQS[3]


def test_builder_output_matches_spec_bytes(tmp_path):
    # Our files equal, byte for byte, the ones written by hand from the spec.
    ours, spec = str(tmp_path / "ours"), str(tmp_path / "spec")
    b = IndexedDatasetBuilder(ours, np.uint16)
    b.add_item(SEQS[0])
    b.add_item(np.array(SEQS[1]))
    b.end_document()
    b.add_document(SEQS[2])
    b.add_document(np.array(SEQS[3] + SEQS[4]), lengths=[5, 1])
    assert b.finalize() == ours
    spec_write(spec, SEQS, DOCS, np.uint16)
    for ext in (".idx", ".bin"):
        assert open(ours + ext, "rb").read() == open(spec + ext, "rb").read()
    version, code, lengths, pointers, docs, rest = spec_parse(ours)
    assert (version, code, docs, rest) == (1, 8, DOCS, b"")
    assert lengths == [3, 2, 0, 5, 1] and pointers == [0, 6, 10, 10, 20]


def test_builder_int32_parsed_by_spec(tmp_path, make_dataset):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100_000, rng.integers(0, 50)) for _ in range(30)]
    prefix = make_dataset(docs, dtype=optimal_dtype(100_000))
    version, code, lengths, pointers, doc_idx, rest = spec_parse(prefix)
    assert (version, code, rest) == (1, 4, b"")
    assert lengths == [len(d) for d in docs] and doc_idx == list(range(31))
    assert pointers == [4 * int(x) for x in np.concatenate([[0], np.cumsum(lengths)[:-1]])]
    raw = np.fromfile(prefix + ".bin", dtype="<i4")
    assert raw.tolist() == np.concatenate(docs).tolist()


def test_optimal_dtype_and_vocab_size():
    assert optimal_dtype(4096) == np.uint16 and optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32 and optimal_dtype(None) == np.int32


def test_builder_vocab_size_picks_dtype(tmp_path):
    assert IndexedDatasetBuilder(str(tmp_path / "a"), vocab_size=50_000).dtype == np.uint16
    assert IndexedDatasetBuilder(str(tmp_path / "b"), vocab_size=128_000).dtype == np.int32
    with pytest.raises(ValueError, match="cannot hold"):
        IndexedDatasetBuilder(str(tmp_path / "c"), np.uint8, vocab_size=1000)
    assert not [p for p in os.listdir(tmp_path) if not p.startswith(".")]  # aborted/unfinalized: no final files


def test_zero_copy_and_read_only(make_dataset):
    ds = IndexedDataset(make_dataset([[1, 2, 3, 4], [5, 6]]))
    a, b = ds[0], ds.get(0, offset=1, length=2)
    assert np.shares_memory(a, b) and not a.flags.writeable
    assert b.tolist() == [2, 3]


def test_index_errors(make_dataset):
    ds = IndexedDataset(make_dataset([[1, 2, 3]]))
    with pytest.raises(IndexError):
        ds[1]
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=2)
    with pytest.raises(ValueError, match="contiguous"):
        ds[0:1:2]
    with pytest.raises(TypeError):
        ds["0"]


def test_pickle_and_exists(make_dataset, tmp_path):
    prefix = make_dataset([[1, 2], [3]])
    ds = pickle.loads(pickle.dumps(IndexedDataset(prefix)))
    assert ds[1].tolist() == [3] and IndexedDataset.exists(prefix)
    assert not IndexedDataset.exists(str(tmp_path / "nope"))


def test_empty_dataset(make_dataset):
    ds = IndexedDataset(make_dataset([]))
    assert len(ds) == 0 and ds.document_indices.tolist() == [0] and ds[:] == []


def test_token_range_is_checked(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "x"), np.uint16)
    with pytest.raises(ValueError, match="70000 does not fit in dtype uint16"):
        b.add_document([1, 70000])
    with pytest.raises(ValueError, match="-1 does not fit"):
        b.add_document([-1])
    with pytest.raises(ValueError, match="float"):
        b.add_document(np.array([1.5]))
    with pytest.raises(ValueError, match="lengths sum"):
        b.add_document([1, 2], lengths=[1])
    b.abort()


def test_torch_tensor_input(tmp_path):
    torch = pytest.importorskip("torch")
    prefix = str(tmp_path / "t")
    with IndexedDatasetBuilder(prefix, np.int32) as b:
        b.add_document(torch.tensor([3, 1, 4]))
    assert IndexedDataset(prefix)[0].tolist() == [3, 1, 4]


def test_interrupted_build_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt), IndexedDatasetBuilder(prefix) as b:
        b.add_document([1, 2, 3])
        assert not os.path.exists(prefix + ".idx") and not os.path.exists(prefix + ".bin")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_killed_builders_temporaries_are_removed_by_the_next_build(tmp_path):
    """SIGKILL skips every cleanup: the next builder of the same prefix removes the dead writer's temporaries, but
    never those of a live process or of another host."""
    import subprocess
    import sys

    from engine.data._files import _temp_stem, lock_temp

    prefix = str(tmp_path / "ds")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that no longer runs (reuse in the next instants is vanishingly unlikely)
    head, bin_stem = _temp_stem(prefix + ".bin")  # ".ds.bin.tmp-HOST-"
    _, idx_stem = _temp_stem(prefix + ".idx")
    dead = os.path.join(head, f"{bin_stem}{child.pid}-0123abcd")
    live = os.path.join(head, f"{idx_stem}1-0123abcd")  # pid 1 always runs
    other_host = os.path.join(head, f".ds.bin.tmp-otherhost-{child.pid}-0123abcd")
    locked = os.path.join(head, f"{bin_stem}{child.pid}-4567cdef")  # a live writer in another pid namespace
    for p in (dead, live, other_host, locked):
        open(p, "w").close()
    with open(locked, "rb") as held:
        lock_temp(held)
        with IndexedDatasetBuilder(prefix) as b:
            b.add_document([1, 2, 3])
        assert not os.path.exists(dead)
        assert os.path.exists(live) and os.path.exists(other_host) and os.path.exists(locked)
    IndexedDatasetBuilder(prefix).abort()  # the lock is gone with its writer
    assert not os.path.exists(locked)
    assert IndexedDataset(prefix)[0].tolist() == [1, 2, 3]


def test_rebuild_replaces_old_dataset(make_dataset):
    make_dataset([[1, 2, 3]] * 10, name="p")
    prefix = make_dataset([[4]], name="p")
    ds = IndexedDataset(prefix)
    assert len(ds) == 1 and ds[0].tolist() == [4]
    assert sorted(os.listdir(os.path.dirname(prefix))) == ["p.bin", "p.idx"]


def test_merge_equals_single_build(make_dataset):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 4096, rng.integers(1, 40)) for _ in range(25)]
    whole = make_dataset(docs, name="whole")
    parts = [make_dataset(docs[:10], name="a"), make_dataset([], name="b"), make_dataset(docs[10:], name="c")]
    merged = merge_datasets(parts, whole.replace("whole", "merged"))
    for ext in (".idx", ".bin"):
        assert open(merged + ext, "rb").read() == open(whole + ext, "rb").read()


def test_merge_rejects_dtype_mismatch(make_dataset, tmp_path):
    a = make_dataset([[1]], name="a", dtype=np.int32)
    b = IndexedDatasetBuilder(str(tmp_path / "m"), np.uint16)
    with pytest.raises(ValueError, match="a.idx: dtype int32 differs"):
        b.add_index(a)
    b.abort()


# ---- bad input: one-line errors naming the file and the problem ----------------------------------------------


def _one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_missing_files(make_dataset, tmp_path):
    prefix = make_dataset([[1]])
    os.remove(prefix + ".bin")
    with pytest.raises(FileNotFoundError) as e:
        IndexedDataset(prefix)
    _one_line(e, prefix + ".bin", "not found")
    with pytest.raises(FileNotFoundError) as e:
        IndexedDataset(str(tmp_path / "none"))
    _one_line(e, "none.idx and", "none.bin")


def _corrupt_idx(prefix, data):
    with open(prefix + ".idx", "wb") as f:
        f.write(data)


@pytest.mark.parametrize(
    "mutate, needles",
    [
        (lambda raw: raw[:20], ["truncated header"]),
        (lambda raw: raw[:-3], ["truncated", "need"]),
        (lambda raw: raw + b"\0" * 5, ["does not match the header"]),
        (lambda raw: b"NOTANIDX\x00" + raw[9:], ["wrong magic"]),
        (lambda raw: raw[:9] + struct.pack("<Q", 2) + raw[17:], ["unsupported version 2"]),
        (lambda raw: raw[:17] + b"\x09" + raw[18:], ["unknown dtype code 9"]),
    ],
)
def test_bad_idx(make_dataset, mutate, needles):
    prefix = make_dataset([[1, 2, 3], [4, 5]])
    raw = open(prefix + ".idx", "rb").read()
    _corrupt_idx(prefix, mutate(raw))
    with pytest.raises(IndexedDatasetError) as e:
        IndexedDataset(prefix)
    _one_line(e, prefix + ".idx", *needles)


def test_truncated_bin(make_dataset):
    prefix = make_dataset([[1, 2, 3], [4, 5]])
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(7)
    with pytest.raises(IndexedDatasetError) as e:
        IndexedDataset(prefix)
    _one_line(e, prefix + ".bin", "truncated", "10")


def test_megatron_reads_ours_and_we_read_megatron(tmp_path):
    """Cross-check with Megatron-LM's own reader/builder where megatron-core is installed (never a dependency)."""
    mg = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 4096, rng.integers(1, 30)) for _ in range(12)]
    ours = str(tmp_path / "ours")
    with IndexedDatasetBuilder(ours, np.uint16) as b:
        for d in docs:
            b.add_document(d)
    theirs_ds = mg.IndexedDataset(ours)
    assert [theirs_ds[i].tolist() for i in range(len(docs))] == [d.tolist() for d in docs]
    assert theirs_ds.document_indices.tolist() == list(range(13))

    theirs = str(tmp_path / "theirs")
    builder = mg.IndexedDatasetBuilder(theirs + ".bin", dtype=np.uint16)
    for d in docs:
        builder.add_document(torch.from_numpy(d), [len(d)])
    builder.finalize(theirs + ".idx")
    ds = IndexedDataset(theirs)
    assert [ds[i].tolist() for i in range(len(docs))] == [d.tolist() for d in docs]
    for ext in (".idx", ".bin"):
        assert open(ours + ext, "rb").read() == open(theirs + ext, "rb").read()
