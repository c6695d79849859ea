"""CheckpointReader: a region is assembled from the shards it intersects, and only their files are opened;
`verify_share` splits the checksums over ranks."""

import json

import pytest
import torch

from engine.checkpoint.checkpointer import MANIFEST, CheckpointError, sha256_file
from engine.checkpoint.reader import CheckpointReader, verify_share


def _write(tmp_path, full, cuts):
    """A checkpoint of one (rows, cols) tensor `w` split by rows at `cuts`, one file per shard."""
    files, shards = {}, []
    edges = [0, *cuts, full.shape[0]]
    for i, (a, b) in enumerate(zip(edges, edges[1:])):
        name = f"model_r{i:05d}.pt"
        torch.save({"w": full[a:b].clone()}, tmp_path / name)
        files[name] = {"sha256": sha256_file(tmp_path / name), "bytes": (tmp_path / name).stat().st_size}
        shards.append({"file": name, "offsets": [a, 0], "shape": [b - a, full.shape[1]]})
    tensors = {"w": {"group": "model", "shape": list(full.shape), "dtype": "float32", "shards": shards}}
    manifest = {"format": 1, "step": 7, "tensors": tensors, "files": files}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    return tmp_path


def test_regions_read_only_the_shards_they_cross(tmp_path):
    full = torch.arange(70, dtype=torch.float32).view(10, 7)
    reader = CheckpointReader(_write(tmp_path, full, [3, 6]))  # rows 0-2, 3-5, 6-9
    assert reader.step == 7 and reader.shape("w") == (10, 7) and reader.names("model") == ["w"]
    assert torch.equal(reader.read("w", [4, 2], [2, 3]), full[4:6, 2:5])
    assert set(reader._open) == {"model_r00001.pt"}  # the middle shard alone
    assert torch.equal(reader.read("w", [2, 0], [5, 7]), full[2:7])  # across three shards
    assert torch.equal(reader.read("w"), full)
    # Past the end (a tensor-parallel shard's vocabulary padding): zeros.
    padded = reader.read("w", [8, 0], [4, 7])
    assert torch.equal(padded[:2], full[8:]) and not padded[2:].any()
    # The result owns its memory (not a view of the mapped file), whole shard or not.
    whole = reader.read("w", [3, 0], [3, 7])
    assert torch.equal(whole, full[3:6])
    whole.add_(1)
    assert torch.equal(reader.read("w", [3, 0], [3, 7]), full[3:6])
    with pytest.raises(CheckpointError, match="holds no tensor nope"):
        reader.read("nope")


def test_verify_share_splits_the_files_over_ranks(tmp_path):
    path = _write(tmp_path, torch.ones(6, 2), [2, 4])
    assert [verify_share(path, r, 3) for r in range(3)] == [None] * 3
    data = bytearray((path / "model_r00001.pt").read_bytes())
    data[-10] ^= 1
    (path / "model_r00001.pt").write_bytes(bytes(data))
    problems = [verify_share(path, r, 2) for r in range(2)]
    assert problems[0] is None and "model_r00001.pt is corrupt" in problems[1]  # sorted files: 0, 1, 2 -> r0, r1, r0
    assert "model_r00001.pt is corrupt" in verify_share(path)
    (path / "model_r00002.pt").unlink()
    assert "model_r00002.pt is missing" in verify_share(path, 0, 2)


def test_flat_shards_of_a_box(tmp_path):
    """ZeRO-1's pieces: flat ranges of a parameter's flattened elements, not rows; regions pick out their elements."""
    full = torch.arange(4 * 5, dtype=torch.float32).view(4, 5)
    files, shards = {}, []
    for i, (lo, hi) in enumerate([(0, 7), (7, 13), (13, 20)]):
        name = f"optim_r{i:05d}.pt"
        torch.save({"m": full.flatten()[lo:hi].clone()}, tmp_path / name)
        files[name] = {"sha256": sha256_file(tmp_path / name), "bytes": (tmp_path / name).stat().st_size}
        shards.append({"file": name, "offsets": [0, 0], "shape": [4, 5], "flat": [lo, hi]})
    tensors = {"m": {"group": "optim", "shape": [4, 5], "dtype": "float32", "shards": shards}}
    (tmp_path / MANIFEST).write_text(json.dumps({"format": 1, "step": 1, "tensors": tensors, "files": files}))
    reader = CheckpointReader(tmp_path)
    assert torch.equal(reader.read("m"), full)
    assert torch.equal(reader.read("m", [1, 1], [2, 3]), full[1:3, 1:4])  # crosses all three pieces
    assert torch.equal(reader.read("m", [3, 0], [1, 5]), full[3:])
    first = CheckpointReader(tmp_path)
    assert torch.equal(first.read("m", [0, 0], [1, 5]), full[:1]) and set(first._open) == {"optim_r00000.pt"}
    # Ranges that leave a gap or overlap are named before any file is read.
    from engine.checkpoint.checkpointer import tiling_problem

    assert tiling_problem([4, 5], shards) is None
    assert "do not tile it" in tiling_problem([4, 5], [shards[0], shards[2]])
    assert "do not tile it" in tiling_problem([4, 5], [shards[0], {**shards[1], "flat": [6, 13]}, shards[2]])
