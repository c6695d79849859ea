"""`python -m engine.checkpoint inspect|verify|consolidate PATH`: look into, check and export checkpoints.

PATH is a run directory, its `checkpoints` folder, or one `step_XXXXXXXX` directory (a run or root means the
checkpoint `latest` names). Exit status: 0 ok, 1 a bad checkpoint (failed checksum, shards that do not tile, an
unreadable file), 2 a usage error (missing path, an output that exists); errors are one line on stderr
(ENGINE_DEBUG=1: a traceback).

    inspect PATH [--tensors] [--json]   step, data position, layout, model shape, tensors per group, files
    verify PATH [--all]                 every file's sha256 and every tensor's shards; --all: every checkpoint
    consolidate PATH --out FILE.safetensors [--dtype fp32|bf16|fp16] [--no-verify] [--force]
                                        the model's tensors, whole, as one safetensors file (written here, without
                                        the safetensors package), one tensor in memory at a time
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint.checkpointer import (
    LATEST,
    MANIFEST,
    CheckpointError,
    _fsync_dir,
    complete_checkpoints,
    damaged_checkpoints,
    resolve_checkpoint_path,
    verify_checkpoint,
)
from engine.checkpoint.reader import CheckpointReader

_CAST = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ST_DTYPE = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_MODEL_KEYS = ("arch", "n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size", "seq_len")


class UsageError(Exception):
    """A mistake in the command line (exit status 2), as opposed to a bad checkpoint (1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like the engine's other errors, instead of usage + error
        raise UsageError(f"{self.prog}: {message}")


def _root_of(path: str) -> Path | None:
    """The checkpoints root PATH names (a run directory's `checkpoints`, or a root itself), or None for a checkpoint."""
    p = Path(path)
    if (p / MANIFEST).is_file() or not p.is_dir():
        return None
    return p if complete_checkpoints(p) or damaged_checkpoints(p) else p / "checkpoints"


def _resolve(path: str) -> tuple[Path, Path | None]:
    """(the checkpoint directory, the checkpoints root when PATH was a run directory or a root, else None)."""
    try:
        ckpt = resolve_checkpoint_path(path)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    return ckpt, _root_of(path)


def _summary(ckpt: Path, root: Path | None, with_tensors: bool) -> dict[str, Any]:
    reader = CheckpointReader(ckpt)
    m = reader.manifest
    groups: dict[str, dict[str, int]] = {}
    tensors = []
    for name, info in m["tensors"].items():
        numel = math.prod(info["shape"])
        g = groups.setdefault(info["group"], {"tensors": 0, "elements": 0, "bytes": 0})
        g["tensors"] += 1
        g["elements"] += numel
        g["bytes"] += numel * reader.dtype(name).itemsize
        tensors.append({"name": name, "group": info["group"], "shape": info["shape"], "dtype": info["dtype"],
                        "shards": len(info["shards"])})  # fmt: skip
    model_cfg = (m.get("config") or {}).get("model") or {}
    out = {
        "path": str(ckpt),
        "step": m.get("step"),
        "consumed_samples": m.get("consumed_samples"),
        "layout": m.get("layout"),
        "model": {k: model_cfg[k] for k in _MODEL_KEYS if k in model_cfg},
        "groups": groups,
        "files": {n: f["bytes"] for n, f in m["files"].items()},
    }
    if with_tensors:
        out["tensors"] = tensors
    if root is not None:
        out["checkpoints"] = [{"step": s, "path": str(d)} for s, d in complete_checkpoints(root)]
        out["damaged"] = [{"step": s, "path": str(d), "problem": why} for s, d, why in damaged_checkpoints(root)]
        try:
            out["latest"] = (root / LATEST).read_text().strip() or None
        except OSError:
            out["latest"] = None
    return out


def _inspect(args) -> int:
    s = _summary(*_resolve(args.path), args.tensors)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    kv = lambda d: " ".join(f"{k}={v}" for k, v in d.items())
    print(f"checkpoint: {s['path']}")
    print(f"step: {s['step']}  consumed samples: {s['consumed_samples']}")
    print(f"layout: {kv(s['layout']) if s['layout'] else '(not recorded)'}")
    if s["model"]:
        print(f"model: {kv(s['model'])}")
    for group, g in s["groups"].items():
        print(f"group {group}: {g['tensors']} tensors, {g['elements']:,} elements, {g['bytes']:,} bytes")
    print(f"files: {len(s['files'])}, {sum(s['files'].values()):,} bytes")
    for name, size in s["files"].items():
        print(f"  {name}  {size:,}")
    for t in s.get("tensors", []):
        print(f"  {t['name']}  {t['group']}  {list(t['shape'])}  {t['dtype']}  {t['shards']} shard(s)")
    if "checkpoints" in s:
        print(f"checkpoints: {len(s['checkpoints'])}, latest names {s['latest'] or '(nothing)'}")
        for c in s["checkpoints"]:
            mark = "  <- latest" if Path(c["path"]).name == s["latest"] else ""
            print(f"  step {c['step']}  {c['path']}{mark}")
        for c in s["damaged"]:
            print(f"  step {c['step']}  DAMAGED: {c['problem']}")
    return 0


def _verify_one(ckpt: Path) -> str:
    manifest = verify_checkpoint(ckpt)  # every file's size and sha256
    CheckpointReader(ckpt).close()  # every tensor's shards tile it
    files = manifest["files"]
    return f"ok: {ckpt} ({len(files)} files, {sum(f['bytes'] for f in files.values()):,} bytes verified)"


def _verify(args) -> int:
    root = _root_of(args.path) if args.all else None
    if root is None:  # one checkpoint: the path's, or the latest (an error if a newer one is damaged)
        ckpt, _ = _resolve(args.path)
        print(_verify_one(ckpt), flush=True)
        return 0
    found = [(s, d, None) for s, d in complete_checkpoints(root)] + damaged_checkpoints(root)
    if not found:
        raise UsageError(f"checkpoint path {args.path} holds no checkpoint")
    status = 0
    for _, d, problem in sorted(found, key=lambda x: x[0]):
        try:
            if problem is not None:
                raise CheckpointError(problem)
            print(_verify_one(d), flush=True)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            status = 1
    return status


def _consolidate(args) -> int:
    ckpt, _ = _resolve(args.path)
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory")
    if out.exists() and not args.force:
        raise UsageError(f"--out {out} exists (--force overwrites it)")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist")
    if sys.byteorder != "little":  # safetensors data is little-endian; tensors are written as they lie in memory
        raise UsageError("consolidate writes safetensors on little-endian hosts only")
    reader = CheckpointReader(ckpt)
    names = reader.names("model")
    if not names:
        raise CheckpointError(f"checkpoint {ckpt} holds no model tensors")
    m = reader.manifest
    if not args.no_verify:  # the files consolidate reads
        verify_checkpoint(ckpt, files=sorted({s["file"] for n in names for s in m["tensors"][n]["shards"]}))
    cast = _CAST[args.dtype] if args.dtype else None
    dtypes = {n: cast if cast is not None and reader.dtype(n).is_floating_point else reader.dtype(n) for n in names}
    header: dict[str, Any] = {}
    begin = 0
    for n, dt in dtypes.items():
        if dt not in _ST_DTYPE:
            raise CheckpointError(f"checkpoint tensor {n} has dtype {dt}, which safetensors cannot hold")
        size = math.prod(reader.shape(n)) * dt.itemsize
        header[n] = {"dtype": _ST_DTYPE[dt], "shape": list(reader.shape(n)), "data_offsets": [begin, begin + size]}
        begin += size
    header["__metadata__"] = {
        "format": "pt",
        "step": str(m.get("step")),
        "consumed_samples": str(m.get("consumed_samples")),
        "arch": str(((m.get("config") or {}).get("model") or {}).get("arch", "")),
        "config": json.dumps(m.get("config") or {}, sort_keys=True),
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            for n in names:
                t = reader.read(n).to(dtypes[n])  # the whole tensor, assembled from its shards
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del t
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        reader.close()
    _fsync_dir(out.parent)
    print(f"wrote {out}: step {m.get('step')}, {len(names)} tensors, {begin:,} bytes ({args.dtype or 'stored dtypes'})")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine.checkpoint", description="Inspect, verify or consolidate a checkpoint.")
    sub = p.add_subparsers(dest="command", required=True)
    path_help = "a run directory, its checkpoints folder, or a step_XXXXXXXX directory"
    c = sub.add_parser("inspect", help="print what a checkpoint holds")
    c.add_argument("path", help=path_help)
    c.add_argument("--tensors", action="store_true", help="one line per tensor: name, shape, dtype, shards")
    c.add_argument("--json", action="store_true", help="a JSON object instead of text")
    c.set_defaults(func=_inspect)
    c = sub.add_parser("verify", help="check every file's sha256 and every tensor's shards")
    c.add_argument("path", help=path_help)
    c.add_argument("--all", action="store_true", help="every complete checkpoint of a run, not only the latest")
    c.set_defaults(func=_verify)
    c = sub.add_parser("consolidate", help="write the model's full tensors as one safetensors file")
    c.add_argument("path", help=path_help)
    c.add_argument("--out", required=True, help="the .safetensors file to write")
    c.add_argument("--dtype", choices=sorted(_CAST), help="cast floating-point tensors (default: as stored)")
    c.add_argument("--no-verify", action="store_true", help="skip the checksums of the files read")
    c.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    c.set_defaults(func=_consolidate)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return args.func(args)
    except (UsageError, CheckpointError, OSError) as e:
        if os.environ.get("ENGINE_DEBUG", "") not in ("", "0"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
