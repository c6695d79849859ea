"""Reading a checkpoint region by region, so that a rank holds only what it loads.

A rank restoring its parameters needs one slice of each tensor (its tensor-parallel rows, its FSDP shard, its
pipeline stage's layers), whatever layout wrote the checkpoint. `CheckpointReader.read(name, offsets, shape)`
assembles exactly that region from the shards the manifest lists, each shard file memory-mapped (`torch.load(...,
mmap=True)`), so only the pages of the intersecting slices are read and the host memory a load takes is this rank's
part plus the region being copied. A region may reach past the tensor's end (a tensor-parallel shard's vocabulary
padding): that part reads as zeros. A shard may also be a flat range of a box (ZeRO-1's pieces of a parameter,
which split its flattened elements, not its rows): the elements of the region that fall in it are picked out.

Integrity: `verify_share` checks the sha256 of a share of the files (every `world`-th one), so a job verifies every
file once, split across its ranks, before any rank loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint.checkpointer import (
    CheckpointError,
    file_problem,
    read_manifest,
    tiling_problem,
    verify_checkpoint,
)


class CheckpointReader:
    """One checkpoint directory's manifest and tensors; shard files opened (memory-mapped) on first use."""

    def __init__(self, ckpt_dir: str | Path) -> None:
        self.path = Path(ckpt_dir)
        self.manifest = read_manifest(self.path)
        self._open: dict[str, Any] = {}
        for name, info in self.manifest["tensors"].items():
            # A manifest edited or corrupted by hand: shards that overlap or leave a gap would read as garbage.
            problem = tiling_problem(info["shape"], info["shards"])
            if problem is not None:
                raise CheckpointError(f"checkpoint tensor {name} in {self.path}: its shards {problem}")

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    def names(self, group: str | None = None) -> list[str]:
        """The tensors of `group` ("model", "optim"), or all, in manifest order."""
        return [n for n, info in self.manifest["tensors"].items() if group is None or info["group"] == group]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return getattr(torch, self._entry(name)["dtype"])

    def _entry(self, name: str) -> dict[str, Any]:
        try:
            return self.manifest["tensors"][name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.path} holds no tensor {name}") from None

    def load_file(self, name: str, mmap: bool = True) -> Any:
        """A file of the checkpoint as torch.load returns it (tensors memory-mapped), cached."""
        if name not in self._open:
            path = self.path / name
            try:
                self._open[name] = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except FileNotFoundError:
                raise CheckpointError(f"checkpoint file {path} is missing") from None
            except Exception as e:  # unpickling and zip errors have many types
                raise CheckpointError(f"checkpoint file {path} is unreadable: {type(e).__name__}") from None
        return self._open[name]

    def read(
        self, name: str, offsets: list[int] | tuple[int, ...] | None = None, shape: list[int] | tuple[int, ...] | None
        = None,
    ) -> torch.Tensor:  # fmt: skip
        """The region of tensor `name` starting at `offsets` with `shape` (default: the whole tensor), as a new
        tensor; elements past the tensor's bounds are zero."""
        info = self._entry(name)
        full = tuple(info["shape"])
        offsets = tuple(offsets) if offsets is not None else (0,) * len(full)
        shape = tuple(shape) if shape is not None else full
        if len(offsets) != len(full) or len(shape) != len(full):
            raise CheckpointError(f"checkpoint tensor {name} has shape {full}; a region {offsets} {shape} does not fit")
        out = None
        for s in info["shards"]:
            lo = [max(o, so) for o, so in zip(offsets, s["offsets"])]
            hi = [min(o + n, so + sn) for o, n, so, sn in zip(offsets, shape, s["offsets"], s["shape"])]
            if any(h <= a for a, h in zip(lo, hi)) or ("flat" in s and not _flat_meets(s, lo, hi)):
                continue
            part = self.load_file(s["file"]).get(name)
            expect = (s["flat"][1] - s["flat"][0],) if "flat" in s else tuple(s["shape"])
            if part is None or tuple(part.shape) != expect:
                got = None if part is None else tuple(part.shape)
                raise CheckpointError(
                    f"checkpoint tensor {name} in {self.path}: its shard in {s['file']} has shape {got}, manifest "
                    f"says {expect}"
                )
            if out is None:
                if "flat" not in s and tuple(offsets) == tuple(s["offsets"]) and tuple(shape) == tuple(s["shape"]):
                    return part.clone()  # the whole shard: one copy out of the mapping
                out = torch.zeros(shape, dtype=part.dtype)
            dst = out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))]
            if "flat" in s:
                _copy_flat(dst, part, s, lo, hi)
            else:
                dst.copy_(part[tuple(slice(a - so, b - so) for a, b, so in zip(lo, hi, s["offsets"]))])
        if out is None:  # wholly past the bounds (padding), or a tensor with no elements
            out = torch.zeros(shape, dtype=self.dtype(name))
        return out

    def read_flat(self, name: str, offsets: list[int], shape: list[int], lo: int, hi: int) -> torch.Tensor:
        """Elements lo..hi-1 of a region in row-major order (ZeRO-1's piece of a parameter), read through the rows
        that hold them: the piece and at most two partial rows in memory, never the whole region."""
        row = math.prod(shape[1:])
        first, last = lo // row, -(-hi // row)
        rows = self.read(name, [offsets[0] + first, *offsets[1:]], [last - first, *shape[1:]])
        return rows.reshape(-1)[lo - first * row : hi - first * row].clone()

    def objects(self) -> dict[str, Any]:
        """The replicated Python state rank 0 wrote (optimizer hyperparameters, loss scaler)."""
        return self.load_file("objects.pt", mmap=False) if "objects.pt" in self.manifest["files"] else {}

    def rank_objects(self, rank: int) -> dict[str, Any] | None:
        """The per-rank state `rank` wrote (RNG, fp8 histories, its optimizer groups), None if it had no such rank."""
        name = f"rank_r{rank:05d}.pt"
        return self.load_file(name, mmap=False) if name in self.manifest["files"] else None

    def saved_ranks(self) -> list[int]:
        return sorted(int(n[len("rank_r") : -len(".pt")]) for n in self.manifest["files"] if n.startswith("rank_r"))

    def close(self) -> None:
        self._open.clear()


def _flat_meets(shard: dict[str, Any], lo: list[int], hi: list[int]) -> bool:
    """Whether a flat shard's range can hold elements of the box [lo, hi): it meets the span between the box's first
    and last elements in the row-major order of the shard's box (so a piece outside it is never opened)."""
    strides = [math.prod(shard["shape"][d + 1 :]) for d in range(len(lo))]
    first = sum((a - so) * st for a, so, st in zip(lo, shard["offsets"], strides))
    last = sum((b - 1 - so) * st for b, so, st in zip(hi, shard["offsets"], strides))
    return shard["flat"][0] <= last and first < shard["flat"][1]


def _copy_flat(dst: torch.Tensor, part: torch.Tensor, shard: dict[str, Any], lo: list[int], hi: list[int]) -> None:
    """Copies into `dst` (the box [lo, hi) of the tensor) the elements a flat shard holds: elements flat[0] to
    flat[1] - 1 of its box in row-major order, `part` being those elements."""
    flo, fhi = shard["flat"]
    strides = [math.prod(shard["shape"][d + 1 :]) for d in range(len(lo))]
    index = torch.zeros((), dtype=torch.int64)
    for d, (a, b, so) in enumerate(zip(lo, hi, shard["offsets"])):  # each element's position in the box
        axis = (torch.arange(a, b) - so) * strides[d]
        index = index.unsqueeze(-1) + axis
    held = (index >= flo) & (index < fhi)
    dst[held] = part[index[held] - flo]


def verify_share(ckpt_dir: str | Path, rank: int = 0, world: int = 1) -> str | None:
    """Checks this rank's share of a checkpoint's files (the manifest's files `rank`, `rank + world`, ...) against
    their sizes and sha256; returns a one-line problem or None. Reading the manifest itself is every rank's."""
    ckpt_dir = Path(ckpt_dir)
    try:
        manifest = read_manifest(ckpt_dir)
    except CheckpointError as e:
        return str(e)
    for i, (name, info) in enumerate(sorted(manifest["files"].items())):
        if i % world == rank and (problem := file_problem(ckpt_dir / name, info)) is not None:
            return problem
    return None


@dataclass
class LoadedCheckpoint:
    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]  # group -> name -> full (global) tensor
    objects: dict[str, Any]
    rank_objects: dict[str, Any] | None  # this rank's per-rank state; None when the saved layout had no such rank


def load_checkpoint(ckpt_dir: str | Path, rank: int = 0, verify: bool = True) -> LoadedCheckpoint:
    """Verifies and loads a whole checkpoint to CPU, each tensor assembled into its global shape (for tools and
    single-process use; a training rank reads only its regions through `CheckpointReader`)."""
    if verify:
        verify_checkpoint(ckpt_dir)
    reader = CheckpointReader(ckpt_dir)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name, info in reader.manifest["tensors"].items():
        tensors.setdefault(info["group"], {})[name] = reader.read(name)
    out = LoadedCheckpoint(reader.path, reader.manifest, tensors, reader.objects(), reader.rank_objects(rank))
    reader.close()
    return out
