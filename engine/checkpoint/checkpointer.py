"""Atomic, verifiable checkpoints: a directory per step, a JSON manifest, a checksum per file, a `latest` pointer.

Layout of `ROOT/step_XXXXXXXX/` (ROOT is `RUN_DIR/checkpoints`):
    manifest.json          format, step, caller metadata (config, layout, ...), every tensor's global shape/dtype
                           and its shards (file, offsets, shape), and the sha256 and size of every other file
    <group>_r<rank>.pt     named tensors of one group ("model", "optim") held by that rank
    objects.pt             small replicated Python state (optimizer hyperparameters, loss scaler), from rank 0
    config.toml            the resolved run config (optional text files, checksummed like the rest)
    rank_r<rank>.pt        per-rank Python state (RNG), one file per rank

Protocol (why a crash never leaves a half checkpoint that looks complete): all ranks write into
`ROOT/.step_XXXXXXXX.tmp/` and fsync their files; their checksums are gathered on rank 0, which writes and fsyncs the
manifest, renames the directory to its final name, fsyncs ROOT, then replaces the `latest` file atomically and applies
retention. Only a `step_XXXXXXXX` directory whose manifest.json reads as a JSON object counts as complete; one
without it (or with a truncated one) is never listed, and loading it fails with a one-line CheckpointError.

Saving a step that already exists (a resumed run redoing a step) cannot swap two directories in one rename: the old
copy is moved aside to `.step_XXXXXXXX.old`, the new one renamed in, and the old one removed (its manifest first).
A crash between the two renames leaves no `step_XXXXXXXX`; listing (`complete_checkpoints`, `latest_checkpoint`) and
the next save rename such an aside copy back, and drop one whose step is complete again. Retention renames a doomed
directory to `.step_XXXXXXXX.deleting` before removing its files, so a crash or an unremovable file mid-way never
leaves a `step_XXXXXXXX` with a manifest but missing files; the next save or retention removes the leftovers.
Directory fsyncs tolerate filesystems that refuse them (see `_DIR_FSYNC_REFUSED`) and raise on real I/O errors.

Tensors are recorded with global shapes and per-shard offsets, so a sharded layout (one file per rank holding
slices) and resharding on load fit the same manifest; for data-parallel replicas rank 0 writes one full shard.
Under tensor parallelism every rank of the first replica writes its slices (`shards` gives each one's global shape
and offsets) and one of them the replicated tensors; the manifest merges the shards of every tensor.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.data._files import atomic_write, fsync_path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
SWAP_LOCK = ".swap.lock"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_ASIDE_RE = re.compile(r"^\.(step_\d{8,})\.old$")  # the old copy of a step being saved again
_DELETING_RE = re.compile(r"^\.(step_\d{8,})\.deleting$")  # a checkpoint being removed by retention
_TMP_RE = re.compile(r"^\.(step_\d{8,})\.tmp$")  # a checkpoint being written

# errno values with which a filesystem or platform refuses to open or fsync a directory, as opposed to failing to
# store data: EINVAL, ENOTSUP/EOPNOTSUPP and ENOSYS (fsync of a directory not supported: some network and FUSE
# filesystems), EBADF (platforms that fsync only descriptors open for writing), EISDIR, EACCES and EPERM (platforms
# that cannot open a directory like a file). A directory fsync only makes a rename survive a power loss; the rename
# is atomic without it, so these are ignored. Any other error (EIO, ENOSPC, EROFS, ...) is raised.
_DIR_FSYNC_REFUSED = frozenset(
    {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF, errno.EISDIR, errno.EACCES, errno.EPERM}
)


class CheckpointError(ValueError):
    """An unusable checkpoint (missing, corrupt, incompatible); the message is one line for the user."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class _HashingWriter:
    """A file's `write` that also feeds the bytes to sha256, so a checkpoint file is hashed as it is written
    instead of read back (what torch.save streams is what lands in the file)."""

    def __init__(self, f: Any) -> None:
        self.f, self.hash, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        self.hash.update(data)
        self.bytes += len(memoryview(data).cast("B"))
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _save_file(obj: Any, path: Path) -> dict[str, Any]:
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(obj, writer)
        f.flush()
        os.fsync(f.fileno())
    if writer.bytes != path.stat().st_size:  # never expected: then hash what is on disk
        return {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return {"sha256": writer.hash.hexdigest(), "bytes": writer.bytes}


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _fsync_dir(path: str | Path) -> None:
    """Flushes a directory's entries (renames into or out of it) to stable storage, where the filesystem allows."""
    try:
        fsync_path(str(path))
    except OSError as e:
        if e.errno not in _DIR_FSYNC_REFUSED:
            raise


def _manifest_ok(d: Path) -> bool:
    """Whether `d` holds a readable manifest (a JSON object): the mark of a complete checkpoint."""
    try:
        return isinstance(json.loads((d / MANIFEST).read_bytes()), dict)
    except (OSError, ValueError, RecursionError):  # missing, unreadable, truncated, not UTF-8 (a ValueError)
        return False


@contextlib.contextmanager
def _swap_lock(root: Path) -> Iterator[None]:
    """Serializes a re-save's two renames with the recovery of an aside copy by another process listing `root`.

    An exclusive flock on ROOT/.swap.lock, released by the OS if its holder dies. Where the file cannot be created
    (a read-only root) or the filesystem has no locks, it goes on without one.
    """
    try:
        fd = os.open(root / SWAP_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        fd = None
    try:
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _recover_aside(root: Path) -> None:
    """Settles the old copies a crash during a re-save left aside (`.step_X.old`): one with a manifest is renamed
    back to `step_X` when that is missing; when `step_X` is complete, its manifest is deleted so that it is never
    taken for a checkpoint (the files go at the next save). Safe with several processes listing at once; where the
    root is read-only nothing changes."""
    try:
        names = [n for n in os.listdir(root) if _ASIDE_RE.match(n)]
    except OSError:
        return
    if not names:
        return
    with _swap_lock(root):
        for n in names:
            aside, final = root / n, root / _ASIDE_RE.match(n).group(1)
            if _manifest_ok(final):
                with contextlib.suppress(OSError):
                    (aside / MANIFEST).unlink()
            elif _manifest_ok(aside) and not os.path.lexists(final):
                try:
                    os.replace(aside, final)
                except OSError:  # another process renamed it first, or a read-only root
                    continue
                with contextlib.suppress(OSError):  # listing stays read-mostly: durability here is best effort
                    _fsync_dir(root)


def _remove_leftovers(root: Path, temporaries: bool = False) -> None:
    """Rank 0 before a save and retention: recovers aside copies, then removes what interrupted re-saves and
    retention left (aside copies without a manifest, `.step_X.deleting` directories) and, with `temporaries` (at
    the start of a save, when no other save can be writing one), interrupted saves' `.step_X.tmp` directories.
    Warns about what cannot be removed."""
    _recover_aside(root)
    for n in os.listdir(root):
        d = root / n
        if (
            _DELETING_RE.match(n)
            or (_ASIDE_RE.match(n) and not _manifest_ok(d))
            or (temporaries and _TMP_RE.match(n) and d.is_dir())
        ):
            try:
                shutil.rmtree(d)
            except OSError as e:
                warnings.warn(f"checkpoint: could not remove the leftover {d}: {e}", stacklevel=3)


def _step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every `step_X` directory under `root` (aside copies of an interrupted re-save recovered first)."""
    root = Path(root)
    if not root.is_dir():
        return []
    _recover_aside(root)
    return [(int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_RE.match(d.name)) and d.is_dir()]


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under `root` (those with a readable manifest), oldest first."""
    return sorted((step, d) for step, d in _step_dirs(root) if _manifest_ok(d))


def damaged_checkpoints(root: str | Path) -> list[tuple[int, Path, str]]:
    """(step, dir, problem) of every `step_X` directory under `root` whose manifest is missing or unreadable, oldest
    first. A save renames its directory into place only once the manifest is on disk, so such a directory is damaged,
    not unfinished: it is reported, never taken for absent (which would let a run start afresh over it)."""
    out = []
    for step, d in _step_dirs(root):
        if not _manifest_ok(d):
            try:
                read_manifest(d)
                problem = f"checkpoint file {d / MANIFEST} is unreadable"
            except CheckpointError as e:
                problem = str(e)
            out.append((step, d, problem))
    return sorted(out)


def newer_damaged(root: str | Path, than: Path | None) -> list[tuple[int, Path, str]]:
    """The damaged checkpoints under `root` newer than the complete one `than` (all of them when None)."""
    step = int(_STEP_RE.match(than.name).group(1)) if than is not None and _STEP_RE.match(than.name) else -1
    return [d for d in damaged_checkpoints(root) if d[0] > step]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (None: none). The `latest` file names it for people and tools;
    a crash between a save's rename and the pointer's update leaves the pointer one behind, so it is not trusted."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint directory from a user path: the directory itself, a checkpoints root, or a run directory (its
    latest checkpoint; an error naming the problem when a newer one is damaged, rather than an older one silently)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist")
    if (p / MANIFEST).is_file():
        return p
    for root in (p, p / "checkpoints"):
        found = latest_checkpoint(root)
        damaged = newer_damaged(root, found)
        if damaged:
            older = f"; pass {found} to use the previous complete one" if found is not None else ""
            raise CheckpointError(f"the latest checkpoint under {root} is damaged: {damaged[-1][2]}{older}")
        if found is not None:
            return found
    raise CheckpointError(f"checkpoint path {p} holds no complete checkpoint (no {MANIFEST})")


def read_manifest(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint file {path} is unreadable: {e.strerror or type(e).__name__}") from None
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"checkpoint file {path} is corrupt (not valid JSON)") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint file {path} is corrupt (not a JSON object)")
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {manifest.get('format')}, expected {FORMAT_VERSION}")
    missing = [k for k in ("tensors", "files") if not isinstance(manifest.get(k), dict)]
    if missing:
        raise CheckpointError(f"checkpoint file {path} is corrupt (no {' or '.join(missing)} table)")
    return manifest


def file_problem(path: Path, info: dict[str, Any]) -> str | None:
    """What is wrong with one checkpoint file against its manifest entry (size and sha256), in one line, or None."""
    try:
        if not path.is_file():
            return f"checkpoint file {path} is missing"
        if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
            return f"checkpoint file {path} is corrupt (sha256 mismatch with {MANIFEST})"
    except OSError as e:
        return f"checkpoint file {path} is unreadable: {e.strerror or type(e).__name__}"
    return None


def verify_checkpoint(ckpt_dir: str | Path, files: list[str] | None = None) -> dict[str, Any]:
    """Checks every file the manifest lists (or only `files`) against its sha256; returns the manifest."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    for name, info in manifest["files"].items():
        if (files is None or name in files) and (problem := file_problem(ckpt_dir / name, info)) is not None:
            raise CheckpointError(problem)
    return manifest


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    tensors: dict[str, dict[str, torch.Tensor]],
    objects: dict[str, Any],
    rank_objects: dict[str, Any],
    meta: dict[str, Any],
    texts: dict[str, str] | None = None,
    keep: int = 0,
    shards: dict[str, tuple[list[int], list[int]]] | None = None,
    write_tensors: bool | None = None,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Writes checkpoint `step` under `root` atomically on every rank (a collective when distributed).

    `tensors` (group -> name -> tensor) are written by the ranks with `write_tensors` (default: rank 0 alone, for
    data-parallel replicas). A tensor named in `shards` (name -> (global shape, offsets)) is this rank's slice of a
    larger tensor; the others are whole, and each must come from one rank only. `objects` are replicated: rank 0
    writes them. `rank_objects` is written by every rank. `meta` (JSON-able: config, layout, data position...) goes
    into the manifest. `texts` (file name -> content, e.g. "config.toml") are written by rank 0 and checksummed like
    the rest. `keep` > 0 deletes all but the newest `keep` complete checkpoints afterwards. `group`: the process
    group of the save's collectives (an async save's own; default: the default group). Returns the final directory.
    """
    root = Path(root)
    distributed = _dist_active()
    rank = dist.get_rank() if distributed else 0
    if write_tensors is None:
        write_tensors = rank == 0
    name = step_dir_name(step)
    tmp = root / f".{name}.tmp"
    final = root / name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root, temporaries=True)  # and a crash's `.step_X.tmp` of this or any other step
        tmp.mkdir()
    if distributed:
        dist.barrier(group=group)

    files: dict[str, dict[str, Any]] = {}
    entries: dict[str, dict[str, Any]] = {}
    shards = shards or {}
    try:
        _write_rank_files(tmp, rank, tensors, objects, rank_objects, texts, shards, write_tensors, files, entries)
        error = None
    except OSError as e:  # a full disk, a quota, a vanished mount: reported by every rank, the old ones kept
        error = f"could not write checkpoint {name} under {root}: {e.strerror or type(e).__name__} ({e.filename})"
    if distributed:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (files, entries, error), group=group)
        error = next((e for _, _, e in gathered if e is not None), None)
    if error is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # what was written of it, to free the space
        raise CheckpointError(f"{error}; the previous checkpoints are intact")
    if distributed:
        files = {k: v for part, _, _ in gathered for k, v in part.items()}
        # Every rank merges (and checks) the same entries, so a bad shard set fails on all ranks alike, not in a hang.
        entries = _merge_entries([part for _, part, _ in gathered])
    else:
        entries = _merge_entries([entries])
    if rank == 0:
        files = dict(sorted(files.items()))
        manifest = {"format": FORMAT_VERSION, "step": step, **meta, "tensors": entries, "files": files}
        # The manifest goes into the temporary directory, which is renamed only once it is on disk: a crash while
        # writing it leaves no `step_X` at all, never one whose manifest is half written.
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        aside = root / f".{name}.old"
        if os.path.lexists(final):  # the same step saved again (e.g. a resumed run that ends where it started)
            # No rename swaps two directories: between these two renames there is no `step_X`, and a crash there
            # leaves the old copy aside with its manifest, for `_recover_aside` to rename back.
            with _swap_lock(root):
                if os.path.lexists(aside):  # left without a manifest, or beside a `step_X` that was not complete
                    shutil.rmtree(aside)
                os.replace(final, aside)
                os.replace(tmp, final)
        else:
            os.replace(tmp, final)
            aside = None
        _fsync_dir(root)
        with atomic_write(str(root / LATEST), "w") as f:  # fsyncs the file, renames it into place
            f.write(name + "\n")
        _fsync_dir(root)  # atomic_write's own directory fsync ignores every error; this one raises real ones
        if aside is not None:
            # The old copy's manifest first, so that a crash or an error mid-way never leaves it recoverable.
            (aside / MANIFEST).unlink(missing_ok=True)
            _fsync_dir(aside)
            shutil.rmtree(aside, ignore_errors=True)  # what stays is removed at the next save
        if keep > 0:
            apply_retention(root, keep)
    if distributed:
        dist.barrier(group=group)
    return final


def _write_rank_files(tmp: Path, rank: int, tensors: dict[str, dict[str, torch.Tensor]], objects: dict[str, Any],
                      rank_objects: dict[str, Any], texts: dict[str, str] | None,
                      shards: dict[str, tuple[list[int], list[int]]], write_tensors: bool,
                      files: dict[str, dict[str, Any]], entries: dict[str, dict[str, Any]]) -> None:  # fmt: skip
    """This rank's files of a checkpoint in `tmp`; fills `files` (name -> checksum, size) and `entries` (tensor ->
    manifest entry)."""
    if write_tensors:
        for group_name, named in tensors.items():
            if not named:
                continue
            fname = f"{group_name}_r{rank:05d}.pt"
            cpu = {k: v.detach().cpu().contiguous() for k, v in named.items()}
            files[fname] = _save_file(cpu, tmp / fname)
            for k, v in cpu.items():
                local = list(v.shape)
                shape, offsets, *flat = shards.get(k, (local, [0] * len(local)))
                shard = {"file": fname, "offsets": list(offsets), "shape": local}
                if flat:  # a flat range of a box (ZeRO-1's piece of a parameter)
                    shard.update(shape=list(flat[0]), flat=list(flat[1]))
                entries[k] = {
                    "group": group_name,
                    "shape": list(shape),
                    "dtype": str(v.dtype).removeprefix("torch."),
                    "shards": [shard],
                }
    if rank == 0:
        files["objects.pt"] = _save_file(objects, tmp / "objects.pt")
        for fname, text in (texts or {}).items():
            with open(tmp / fname, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            files[fname] = {"sha256": sha256_file(tmp / fname), "bytes": (tmp / fname).stat().st_size}
    rank_file = f"rank_r{rank:05d}.pt"
    files[rank_file] = _save_file(rank_objects, tmp / rank_file)


def _merge_entries(parts: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One manifest entry per tensor from every rank's entries: the shards of a tensor joined, checked to tile it."""
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for name, e in part.items():
            if name not in merged:
                merged[name] = {**e, "shards": list(e["shards"])}
                continue
            m = merged[name]
            if (m["group"], m["shape"], m["dtype"]) != (e["group"], e["shape"], e["dtype"]):
                raise ValueError(
                    f"save_checkpoint: ranks disagree on tensor {name}: {m['group']} {m['shape']} {m['dtype']} vs "
                    f"{e['group']} {e['shape']} {e['dtype']}"
                )
            m["shards"].extend(e["shards"])
    for name, m in merged.items():
        m["shards"].sort(key=lambda sh: (sh["offsets"], sh.get("flat", [0])))
        problem = tiling_problem(m["shape"], m["shards"])
        if problem is not None:
            raise ValueError(
                f"save_checkpoint: the shards of {name} {problem} "
                "(a whole tensor passed by more than one rank, wrong offsets, or a missing slice)"
            )
    return merged


def tiling_problem(shape: list[int] | tuple[int, ...], shards: list[dict[str, Any]]) -> str | None:
    """None if `shards` (each with "offsets" and "shape") tile a tensor of `shape` exactly, else what is wrong.

    Every shard lies inside the bounds and no two overlap (pairwise: tp-many shards), so with the element count equal
    the shards cover every element exactly once. A shard with "flat": [lo, hi] holds elements lo..hi-1 of its box
    (offsets, shape) in row-major order; the flat shards of one box must tile it, and then count as the box.
    """
    shape = list(shape)
    boxes: dict[tuple, list[list[int]]] = {}
    for s in shards:
        if "flat" in s:
            boxes.setdefault((tuple(s["offsets"]), tuple(s["shape"])), []).append(list(s["flat"]))
    for (offsets, size), ranges in boxes.items():
        ranges.sort()
        end = 0
        for lo, hi in ranges:
            if lo != end or hi <= lo:
                return f"include flat ranges {ranges} of the box at offsets {list(offsets)} that do not tile it"
            end = hi
        if end != math.prod(size):
            return f"include flat ranges {ranges} of the box at offsets {list(offsets)} that do not tile it"
    shards = [s for s in shards if "flat" not in s] + [{"offsets": o, "shape": n} for o, n in boxes]
    for s in shards:
        offsets, size = list(s["offsets"]), list(s["shape"])
        if len(offsets) != len(shape) or len(size) != len(shape):
            return f"include one at offsets {offsets} with shape {size}, not of the tensor's rank {len(shape)}"
        if any(o < 0 or n < 0 or o + n > d for o, n, d in zip(offsets, size, shape)):
            return f"include one at offsets {offsets} with shape {size}, outside the tensor's shape {shape}"
    covered, total = sum(math.prod(s["shape"]) for s in shards), math.prod(shape)
    if covered != total:
        return f"hold {covered} of {total} elements"
    for i, a in enumerate(shards):
        for b in shards[:i]:
            common = [
                min(oa + na, ob + nb) - max(oa, ob)
                for oa, na, ob, nb in zip(a["offsets"], a["shape"], b["offsets"], b["shape"])
            ]
            if all(n > 0 for n in common):
                return (
                    f"overlap: offsets {list(b['offsets'])} shape {list(b['shape'])} and offsets "
                    f"{list(a['offsets'])} shape {list(a['shape'])}"
                )
    return None


def _remove_doomed(doomed: Path) -> None:
    """Removes a checkpoint directory retention has renamed out of the listing."""
    shutil.rmtree(doomed)


def apply_retention(root: str | Path, keep: int) -> list[Path]:
    """Deletes all but the newest `keep` complete checkpoints (never the one `latest` names); returns the deleted.

    Each is first renamed to a hidden `.step_X.deleting` (made durable by a directory fsync), then its files are
    removed, so a crash or an unremovable file mid-way leaves nothing that looks complete; leftovers are removed by
    the next retention or save. A checkpoint that cannot be deleted is warned about, not raised: the newest are
    saved by then, and a raise on rank 0 would leave the other ranks of a save waiting at its final barrier.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    _remove_leftovers(root)
    found = complete_checkpoints(root)
    protected = latest_checkpoint(root)
    deleted = []
    for _, d in found[: max(0, len(found) - keep)]:
        if protected is not None and d.resolve() == protected.resolve():
            continue
        doomed = root / f".{d.name}.deleting"
        try:
            if os.path.lexists(doomed):  # left by an earlier retention of a step saved again since
                shutil.rmtree(doomed)
            os.replace(d, doomed)
        except OSError as e:
            warnings.warn(f"checkpoint retention: could not delete {d}: {e}", stacklevel=2)
            continue
        deleted.append(d)
        try:
            _fsync_dir(root)  # the rename on disk before any file goes
            _remove_doomed(doomed)
        except OSError as e:
            warnings.warn(
                f"checkpoint retention: {d} is retired but {doomed} could not be removed ({e}); the next save or "
                "retention tries again",
                stacklevel=2,
            )
    return deleted
