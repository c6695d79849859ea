"""Checkpoints for other trainers: `save` and `load` over any module and optimizer.

The module may be plain, wrapped in DDP, sharded by FSDP2 (`fully_shard`) or built from this engine's parallel
layers (tensor parallelism through `parallelize_gpt`); the checkpoint is the one the engine's trainer writes (a
manifest of global shapes and shard offsets, a checksum per file, atomic rename, `latest`), so it loads into any
other of these layouts, and `python -m engine.checkpoint` inspects, verifies and consolidates it:

    from engine.checkpoint import AsyncSaver, load, save

    saver = AsyncSaver()                                   # optional: background writes
    start = load(run_dir, model=model, optimizer=opt).step if has_checkpoint(run_dir) else 0
    for step in range(start + 1, steps + 1):
        loss = model(next(batches)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 100 == 0:
            save(run_dir, step, model=model, optimizer=opt, extra={"data_position": step}, saver=saver)
    saver.wait()

Every rank calls `save` and `load` (collectives when distributed). RNG states are saved per rank and restored
when the world size is the one that saved them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.checkpoint.async_saver import AsyncSaver
from engine.checkpoint.checkpointer import CheckpointError, complete_checkpoints, resolve_checkpoint_path
from engine.checkpoint.reader import CheckpointReader, verify_share
from engine.checkpoint.training_state import agreed, restore_training_state, save_training_state
from engine.parallel.sharding import sharding_of


@dataclass
class Loaded:
    path: Path
    step: int
    extra: Any  # what `save` was given as `extra`


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP's `.module` and torch.compile's `_orig_mod` (FSDP2 modules are their own)."""
    while isinstance(getattr(model, "module", None), nn.Module) or isinstance(getattr(model, "_orig_mod", None),
                                                                              nn.Module):  # fmt: skip
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _ranks(model: nn.Module) -> tuple[dict[str, Any], int, int]:
    """(layout, tp rank, rank among the replicas of this rank's tensors). Tensor parallelism is read from the
    module's sharding registry (this engine's parallel layers); the replicas are the engine's dp x cp group where
    its default grid is set up, else the ranks that differ by a multiple of tp (tp fastest, as the grid lays out)."""
    from engine.parallel import state

    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    group = sharding_of(model).tp_group
    tp, tp_rank = (dist.get_world_size(group), dist.get_rank(group)) if group is not None else (1, 0)
    replica = state.get_rank_in("dp_cp") if state.is_initialized() else rank // tp
    return {"world_size": world, "tp": tp, "dp": world // tp}, tp_rank, replica


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether `run_dir` (or its `checkpoints` folder) holds a complete checkpoint."""
    root = Path(run_dir)
    return bool(complete_checkpoints(root / "checkpoints") or complete_checkpoints(root))


def save(run_dir: str | Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
         extra: Any = None, keep: int = 0, saver: AsyncSaver | None = None) -> Path | None:  # fmt: skip
    """Writes checkpoint `step` under RUN_DIR/checkpoints (each rank its own shards); with `saver`, stages it and
    writes in the background (returns None; `saver.wait()` before exiting). `extra`: tensors and plain Python
    values (weights_only-loadable), e.g. the data position. `keep` > 0: retain that many newest checkpoints."""
    inner = _unwrap(model)
    layout, tp_rank, dp_rank = _ranks(inner)
    device = _device(inner)
    meta = {"consumed_samples": 0, "layout": layout, "extra_keys": sorted(extra) if isinstance(extra, dict) else []}
    return save_training_state(
        Path(run_dir) / "checkpoints", step, chunks=[inner], optimizer=optimizer, sharding=sharding_of(inner),
        scaler=None, rng_trackers=[], device=device, meta=meta, toml="", keep=keep, tp_rank=tp_rank,
        dp_rank=dp_rank, saver=saver, extra=extra,
    )  # fmt: skip


def load(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Loaded:
    """Loads the checkpoint at `path` (a step directory, or the latest complete one of a run directory or its
    `checkpoints` folder) into `model` and `optimizer`, whatever layout saved it; checksums verified first."""
    p = Path(path)
    target = resolve_checkpoint_path(p / "checkpoints" if (p / "checkpoints").is_dir() else p)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problem = agreed(verify_share(target, rank, world))
    if problem is not None:
        raise CheckpointError(problem)
    inner = _unwrap(model)
    layout, _, _ = _ranks(inner)
    reader = CheckpointReader(target)
    extra = reader.objects().get("extra")
    step, _ = restore_training_state(
        reader, chunks=[inner], optimizer=optimizer, sharding=sharding_of(inner), scaler=None, rng_trackers=[],
        device=_device(inner), layout=layout, rank=rank, whole=True,
    )  # fmt: skip
    return Loaded(target, step, extra)
