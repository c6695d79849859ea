"""The resume policy and the training state a checkpoint holds.

Policy (docs/contracts.md, "Resume exactness"): `--resume auto` continues from the latest complete checkpoint, `never`
refuses a run directory that holds checkpoints, a path resumes from that checkpoint. A resume may change the number
of steps, logging, evaluation, checkpointing, precision and implementation choices (kernels, recomputation,
optimizer implementation); a different model shape, optimizer, schedule, data or global batch refuses to resume
unless forced. Resuming into another tensor-parallel size (resharding) is refused for now.

State: parameters and optimizer state by canonical parameter name (each rank of the first data-parallel replica
writes its tensor-parallel slices, padding dropped, with their place in the full tensor; tp rank 0 also the
replicated ones), the loss scaler, every rank's RNG states (default generators and the tp dropout stream), the
schedule and the data position (consumed samples).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.checkpoint.checkpointer import (
    CheckpointError,
    LoadedCheckpoint,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    read_manifest,
    resolve_checkpoint_path,
    save_checkpoint,
)
from engine.checkpoint.state import (
    as_like,
    capture_rng_state,
    full_tensor,
    named_to_optimizer_state,
    optimizer_state_to_named,
    restore_rng_state,
)
from engine.config import Config
from engine.model.init import canonical_name
from engine.parallel.data_parallel import grad_buffers_of
from engine.parallel.sharding import ShardingRegistry
from engine.precision.fp8 import fp8_state, load_fp8_state

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
    "train": ("global_batch", "seed"),
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


def layout_text(layout: dict[str, Any]) -> str:
    keys = ("world_size", "dp", "tp", "sp", "pp", "virtual_stages", "cp", "dp_shard")
    return " ".join(f"{k}={layout[k]}" for k in keys if k in layout)


def resume_target(cfg: Config, ckpt_root: Path) -> Path | None:
    """The checkpoint this run resumes from (None: a fresh start); checked before any process group or data work."""
    if cfg.resume not in ("auto", "never"):
        try:
            return resolve_checkpoint_path(cfg.resume)
        except CheckpointError as e:
            raise CheckpointError(f"--resume: {e}") from None
    if cfg.resume == "never" and complete_checkpoints(ckpt_root):
        raise CheckpointError(
            f"--resume never, but {ckpt_root} already holds checkpoints that this run would overwrite; "
            "use another --run.dir or --resume auto"
        )
    return latest_checkpoint(ckpt_root) if cfg.resume == "auto" else None


def open_checkpoint(path: Path, cfg: Config, rcfg: Config, layout: dict[str, Any], rank: int,
                    notes: list[str]) -> LoadedCheckpoint:  # fmt: skip
    """Loads (verified) the checkpoint at `path` for this rank after checking that this run may resume from it;
    may set rcfg.optim.decay_steps to the checkpoint's (see module docstring)."""
    saved = read_manifest(path).get("layout", {})
    for key in ("tp", "pp", "virtual_stages"):
        if saved.get(key, 1) != layout.get(key, 1):
            raise CheckpointError(
                f"checkpoint {path} was saved with {key}={saved.get(key, 1)} ({layout_text(saved)}), this run has "
                f"{key}={layout.get(key, 1)} ({layout_text(layout)}); resuming into another {key} (resharding) is not "
                f"implemented yet: run with --parallel.{key} {saved.get(key, 1)}"
            )
    loaded = load_checkpoint(path, rank=rank)
    saved_cfg = loaded.manifest.get("config", {})
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
    return loaded


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


def _param_of(key: str) -> str:
    """The parameter an optimizer tensor `optim.<param>.<state>` belongs to."""
    return key[len("optim.") :].rpartition(".")[0]


def _named_parameters(chunks: Sequence[nn.Module]) -> tuple[dict[str, nn.Parameter], dict[str, str]]:
    """(canonical name -> parameter over this rank's chunks, tied copy's name -> the name whose values it holds).
    A tied embedding's copy held apart from the embedding (a last pipeline stage's output weight) is not saved: the
    checkpoint's global view holds the embedding once, as an unsplit model's does."""
    params: dict[str, nn.Parameter] = {}
    aliases: dict[str, str] = {}
    for chunk in chunks:
        tied = getattr(chunk, "tied_aliases", {}) if getattr(chunk, "tok_emb", 0) is None else {}
        for n, p in chunk.named_parameters():
            name = canonical_name(n)
            params[name] = p
            if name in tied:
                aliases[name] = tied[name]
    return params, aliases


def _local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2), or `t`."""
    return t.to_local() if hasattr(t, "to_local") else t


def save_training_state(
    root: Path, step: int, *, chunks: Sequence[nn.Module], optimizer: torch.optim.Optimizer,
    sharding: ShardingRegistry, scaler: Any, rng_trackers: Sequence[Any], device: torch.device, meta: dict[str, Any],
    toml: str, keep: int, tp_rank: int, dp_rank: int,
) -> Path:  # fmt: skip
    """Writes checkpoint `step` (a collective over every rank; see module docstring for who writes what).
    `chunks`: this rank's model chunks (one without pipeline parallelism)."""
    for chunk in chunks:
        if (buffers := grad_buffers_of(chunk)) is not None:  # ZeRO-1: the step's all-gathers may be in flight
            buffers.wait_params()
        if hasattr(chunk, "reshard"):  # FSDP2: an evaluation's forward leaves the root's parameters unsharded
            chunk.reshard()
    params, aliases = _named_parameters(chunks)
    bad = [name for name, p in params.items() if not torch.isfinite(_local_part(p.detach())).all()]
    flag = torch.tensor([float(len(bad))], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:  # every rank refuses together (no rank left waiting)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        where = f"parameter {bad[0]}" if bad else "a parameter on another rank"
        raise CheckpointError(
            f"{where} holds non-finite values at step {step}: not saving it over the last good checkpoint; lower "
            "optim.lr or check the data"
        )
    names = {id(p): n for n, p in params.items()}
    otensors, ometa = optimizer_state_to_named(optimizer, names)
    tensors = {"model": {n: full_tensor(p.detach()) for n, p in params.items()}, "optim": otensors}
    out: dict[str, dict[str, torch.Tensor]] = {}
    shards: dict[str, tuple[list[int], list[int]]] = {}
    for group, named in tensors.items():
        out[group] = {}
        for key, value in named.items():
            if (_param_of(key) if group == "optim" else key) in aliases:
                continue  # a tied copy: its values and state are the embedding's
            spec = sharding.get(_param_of(key) if group == "optim" else key)
            if spec is None or not spec.sharded or value.dim() != len(spec.global_shape):
                if tp_rank == 0:  # replicated (or a scalar state such as `step`): written once
                    out[group][key] = value
                continue
            _, _, rows = spec.shard_range()
            if rows == 0:  # a shard of nothing but vocabulary padding
                continue
            out[group][key] = spec.valid_local(value)
            shards[key] = (list(spec.global_shape), spec.offsets())
    return save_checkpoint(
        root,
        step,
        tensors=out,
        objects={"optim": ometa, "scaler": scaler.state_dict() if scaler is not None else None},
        rank_objects={
            "rng": capture_rng_state(device),
            "rng_tracker": [t.get_states() if t is not None else None for t in rng_trackers],
            "fp8": fp8_state(chunks),  # delayed scaling's amax histories: a resumed run scales as the straight one
            "optim": ometa,  # each pipeline stage's optimizer holds its own parameters
        },
        meta=meta,
        texts={"config.toml": toml},
        keep=keep,
        shards=shards,
        write_tensors=dp_rank == 0,
    )


def _local(value: torch.Tensor, spec: Any, what: str) -> torch.Tensor:
    if spec is None or not spec.sharded or value.dim() != len(spec.global_shape):
        return value
    if tuple(value.shape) != tuple(spec.global_shape):
        raise CheckpointError(f"checkpoint tensor {what} has shape {tuple(value.shape)}, expected {spec.global_shape}")
    return spec.local_from_full(value)


@torch.no_grad()
def restore_training_state(
    ck: LoadedCheckpoint, *, chunks: Sequence[nn.Module], optimizer: torch.optim.Optimizer,
    sharding: ShardingRegistry, scaler: Any, rng_trackers: Sequence[Any], device: torch.device,
) -> tuple[int, int]:  # fmt: skip
    """Loads a checkpoint's full tensors into this rank's (sliced) parameters and optimizer, the loss scaler and
    this rank's RNG states; returns (step, consumed samples). A tied copy takes the embedding's tensors."""
    params, aliases = _named_parameters(chunks)
    saved = ck.tensors["model"]
    needed = {aliases.get(n, n) for n in params}
    missing = sorted(needed - set(saved))
    whole = len(chunks) == 1 and all(getattr(chunks[0], k, None) is not None for k in ("tok_emb", "output"))
    unexpected = sorted(set(saved) - needed) if whole else []  # a pipeline stage holds only its own part
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ck.path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, p in params.items():
        value = _local(saved[aliases.get(name, name)], sharding.get(name), name)
        if tuple(value.shape) != tuple(p.shape):
            raise CheckpointError(
                f"checkpoint {ck.path} does not fit this model: {name} has shape {tuple(value.shape)}, "
                f"the model's {tuple(p.shape)}"
            )
        p.copy_(as_like(value, p))
    holders: dict[str, list[str]] = {}  # saved parameter name -> the live parameters taking its optimizer state
    for name in params:
        holders.setdefault(aliases.get(name, name), []).append(name)
    optim = {}
    for key, value in ck.tensors.get("optim", {}).items():
        source, state = _param_of(key), key.rpartition(".")[2]
        for name in holders.get(source, []):
            optim[f"optim.{name}.{state}"] = _local(value, sharding.get(name), key)
    try:
        meta = (ck.rank_objects or {}).get("optim") or ck.objects["optim"]  # this rank's groups when saved per rank
        named_to_optimizer_state(optimizer, {id(p): n for n, p in params.items()}, optim, meta)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().strip("'").splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {ck.path} does not fit this optimizer: {first}") from None
    if scaler is not None and ck.objects.get("scaler"):
        scaler.load_state_dict(ck.objects["scaler"])
    if ck.rank_objects is not None:  # the same rank existed when it was saved (a new layout keeps fresh seeds)
        restore_rng_state(ck.rank_objects["rng"], device)
        load_fp8_state(chunks, ck.rank_objects.get("fp8"))
        for tracker, states in zip(rng_trackers, ck.rank_objects.get("rng_tracker") or []):
            if states and tracker is not None:  # same tp and pp (checked), so the same ranks
                tracker.set_states({k: tuple(v) for k, v in states.items()})
    return int(ck.manifest["step"]), int(ck.manifest["consumed_samples"])
