"""The resume policy and the training state a checkpoint holds.

Policy (docs/contracts.md, "Resume exactness"): `--resume auto` continues from the latest complete checkpoint, `never`
refuses a run directory that holds checkpoints, a path resumes from that checkpoint. A resume may change the number
of steps, logging, evaluation, checkpointing, precision and implementation choices (kernels, recomputation,
optimizer implementation); a different model shape, optimizer, schedule, data or global batch refuses to resume
unless forced. Any parallel layout resumes from any other (resharding): each rank reads the regions of the saved
tensors it holds now.

State: parameters and optimizer state by canonical parameter name (each rank of the first data-parallel replica
writes its tensor-parallel slices, padding dropped, with their place in the full tensor, and under FSDP2 its shard
of them, so no rank gathers what it does not hold; tp rank 0 also the replicated ones), the loss scaler, every
rank's RNG states (default generators and the tp dropout stream), the schedule and the data position (consumed
samples). On load a rank reads only its own regions (its tp rows, its FSDP2 shard, its stage's layers) from
memory-mapped shard files; the RNG states and fp8 histories are per rank and restored only into the layout that
saved them.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from engine.checkpoint.checkpointer import (
    CheckpointError,
    complete_checkpoints,
    damaged_checkpoints,
    latest_checkpoint,
    newer_damaged,
    resolve_checkpoint_path,
)
from engine.checkpoint.reader import CheckpointReader, verify_share
from engine.checkpoint.training_state import agreed, layout_key, layout_text
from engine.config import Config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Config keys a resume must not change. Everything else may change. optim.decay_steps is compared resolved; 0 (follow
# train.steps) keeps the checkpoint's on a resume.
RESUME_LOCKED = {
    "model": None,  # every key but the free ones below
    "optim": None,
    "data": ("path", "valid_path", "tokenizer", "bpe_vocab"),
    "train": ("global_batch", "seed", "objective"),
    "objective": None,
}
RESUME_FREE_KEYS = ("model.kernels", "model.recompute", "optim.impl")  # implementation choices, same math


def resolved_config(cfg: Config, model_cfg: Any) -> Config:
    """The config with its data-derived defaults filled in (vocab size, ffn width, kv heads, decay steps)."""
    out = copy.deepcopy(cfg)
    out.model = copy.deepcopy(model_cfg)
    if out.optim.decay_steps == 0:
        out.optim.decay_steps = out.train.steps
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any], label: str = "checkpoint") -> list[str]:
    """The locked keys (`RESUME_LOCKED`) whose values differ between a saved config (a checkpoint's, or `label`)
    and this run's."""
    diffs = []
    for section, keys in RESUME_LOCKED.items():
        s, c = saved.get(section, {}), current.get(section, {})
        names = keys if keys is not None else sorted(set(s) | set(c))
        for k in names:
            if f"{section}.{k}" in RESUME_FREE_KEYS:
                continue
            if s.get(k) != c.get(k):
                hint = ""
                if f"{section}.{k}" == "optim.decay_steps":
                    hint = f" (pass --optim.decay_steps {s.get(k)}, or 0, to keep the schedule)"
                diffs.append(f"{section}.{k}: {label} {s.get(k)!r}, now {c.get(k)!r}{hint}")
    return diffs


def resume_target(cfg: Config, ckpt_root: Path) -> Path | None:
    """The checkpoint this run resumes from (None: a fresh start); checked before any process group or data work."""
    if cfg.resume not in ("auto", "never"):
        try:
            return resolve_checkpoint_path(cfg.resume)
        except CheckpointError as e:
            raise CheckpointError(f"--resume: {e}") from None
    if cfg.resume == "never" and (complete_checkpoints(ckpt_root) or damaged_checkpoints(ckpt_root)):
        raise CheckpointError(
            f"--resume never, but {ckpt_root} already holds checkpoints that this run would overwrite; "
            "use another --run.dir or --resume auto"
        )
    if cfg.resume != "auto":
        return None
    found = latest_checkpoint(ckpt_root)
    damaged = damaged_checkpoints(ckpt_root)
    if found is None and damaged:  # starting afresh would overwrite them: the user decides
        raise CheckpointError(f"no usable checkpoint under {ckpt_root}: {damaged[-1][2]}; move the run directory's "
                              "checkpoints aside to start afresh")  # fmt: skip
    return found


def open_checkpoint(path: Path, cfg: Config, rcfg: Config, layout: dict[str, Any],
                    notes: list[str]) -> CheckpointReader:  # fmt: skip
    """The checkpoint this run resumes from, verified (every file once, split across the ranks) and checked against
    this config; may set rcfg.optim.decay_steps to the checkpoint's (see module docstring). A collective.

    With `--resume auto`, a corrupt or partial checkpoint is skipped with a note naming it and the previous complete
    one is used; an explicit path that fails verification is an error."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    candidates = [path]
    if cfg.resume == "auto":
        candidates += [d for _, d in reversed(complete_checkpoints(path.parent)) if d.resolve() != path.resolve()]
    problems = []
    for candidate in candidates:
        problem = agreed(verify_share(candidate, rank, world))
        if problem is None:
            path = candidate
            break
        problems.append(problem)
        if cfg.resume != "auto":
            raise CheckpointError(problem)
    else:
        raise CheckpointError(f"no usable checkpoint under {path.parent}: {problems[0]}")
    if cfg.resume == "auto":  # damaged manifests (not listed as complete) newer than the one used
        problems = [problem for _, _, problem in newer_damaged(path.parent, path)] + problems
    for problem in problems:
        notes.append(f"skipped an unusable checkpoint: {problem}; resuming from the previous complete one, {path}")
    reader = CheckpointReader(path)
    saved = reader.manifest.get("layout", {})
    if layout_key(saved) != layout_key(layout):
        notes.append(
            f"resharding {path.name} from {layout_text(saved)} to {layout_text(layout)}: model and optimizer state "
            "are resliced; RNG streams (dropout) and fp8 amax histories start afresh"
        )
    saved_cfg = reader.manifest.get("config", {})
    saved_decay = saved_cfg.get("optim", {}).get("decay_steps")
    if cfg.optim.decay_steps == 0 and saved_decay and saved_decay != rcfg.optim.decay_steps:
        # decay_steps 0 follows train.steps; a resume may change train.steps without changing the schedule the run
        # was started on, so the LR stays a function of the step alone.
        rcfg.optim.decay_steps = saved_decay
        notes.append(
            f"train.steps {cfg.train.steps}: keeping the checkpoint's schedule (optim.decay_steps {saved_decay}; set "
            "--optim.decay_steps and --checkpoint.force_resume true to change it)"
        )
    diffs = config_differences(saved_cfg, rcfg.to_dict())
    if diffs and not cfg.checkpoint.force_resume:
        raise CheckpointError(
            f"checkpoint {path} was trained with a different config ({'; '.join(diffs)}); use another --run.dir, or "
            "--checkpoint.force_resume true to resume anyway"
        )
    return reader


def check_fresh_start(cfg: Config, rcfg: Config, run_dir: Path) -> None:
    """A run directory with records but no checkpoint: starting over is fine with the same config; with another
    this run would replace its config.toml and records, so it must be asked for (--checkpoint.force_resume)."""
    if not (run_dir / "config.toml").is_file() or cfg.checkpoint.force_resume:
        return
    try:
        old = tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{run_dir / 'config.toml'} is unreadable ({first}); use another --run.dir, or "
            "--checkpoint.force_resume true to start over in it"
        ) from None
    if cfg.optim.decay_steps == 0:  # starting over follows the new train.steps: not a schedule change
        old.setdefault("optim", {})["decay_steps"] = rcfg.optim.decay_steps
    diffs = config_differences(old, rcfg.to_dict(), label="config.toml")
    if diffs:
        raise CheckpointError(
            f"{run_dir} holds a run with a different config and no checkpoint ({'; '.join(diffs)}); "
            "use another --run.dir, or --checkpoint.force_resume true to start over in it"
        )
