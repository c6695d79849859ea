"""The resume policy and the training state a checkpoint holds.

Policy (docs/contracts.md, "Resume exactness"): `--resume auto` continues from the latest complete checkpoint, `never`
refuses a run directory that holds checkpoints, a path resumes from that checkpoint. A resume may change the number
of steps, logging, evaluation, checkpointing, precision and implementation choices (kernels, recomputation,
optimizer implementation); a different model shape, optimizer, schedule, data or global batch refuses to resume
unless forced. Any parallel layout resumes from any other (resharding): each rank reads the regions of the saved
tensors it holds now.

State: parameters and optimizer state by canonical parameter name (each rank of the first data-parallel replica
writes its tensor-parallel slices, padding dropped, with their place in the full tensor; tp rank 0 also the
replicated ones), the loss scaler, every rank's RNG states (default generators and the tp dropout stream), the
schedule and the data position (consumed samples). On load a rank reads only its own regions (its tp rows, its
FSDP2 shard, its stage's layers) from memory-mapped shard files; the RNG states and fp8 histories are per rank and
restored only into the layout that saved them.
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
    complete_checkpoints,
    latest_checkpoint,
    resolve_checkpoint_path,
    save_checkpoint,
)
from engine.checkpoint.reader import CheckpointReader, verify_share
from engine.checkpoint.state import (
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
        problem = _agreed(verify_share(candidate, rank, world))
        if problem is None:
            path = candidate
            break
        problems.append(problem)
        if cfg.resume != "auto":
            raise CheckpointError(problem)
    else:
        raise CheckpointError(f"no usable checkpoint under {path.parent}: {problems[0]}")
    for problem in problems:
        notes.append(f"skipped an unusable checkpoint: {problem}; resuming from the previous complete one, {path}")
    reader = CheckpointReader(path)
    saved = reader.manifest.get("layout", {})
    if _layout_key(saved) != _layout_key(layout):
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


def _agreed(problem: str | None) -> str | None:
    """The first rank's problem with a checkpoint, the same on every rank (a collective when distributed)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return problem
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problem)
    return next((p for p in everyone if p is not None), None)


def _layout_key(layout: dict[str, Any]) -> tuple:
    """What makes two layouts hold the same per-rank state (RNG streams, fp8 histories, optimizer groups)."""
    keys = ("world_size", "dp", "tp", "pp", "virtual_stages", "cp", "dp_shard")
    return tuple(layout.get(k, 1) for k in keys)


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


def _region(name: str, p: torch.Tensor, spec: Any) -> tuple[tuple[int, ...], list[int], list[int]]:
    """(global shape, offsets, shape) of what parameter `p` holds on this rank, in the checkpoint's unsplit tensor:
    its tensor-parallel rows (padding past the end included: it reads as zeros), and within them its FSDP2 shard."""
    if spec is not None and spec.sharded:
        full, offsets, shape = tuple(spec.global_shape), spec.offsets(), list(spec.local_shape)
    else:
        full = tuple(p.shape)
        offsets, shape = [0] * len(full), list(full)
    if hasattr(p, "device_mesh"):  # a DTensor over the data-parallel mesh: its shard of the tensor-parallel part
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local, offset = compute_local_shape_and_global_offset(tuple(shape), p.device_mesh, p.placements)
        offsets, shape = [o + d for o, d in zip(offsets, offset)], list(local)
    return full, offsets, shape


def _placed(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's region `value` on `like`'s device and, for a DTensor `like`, as a DTensor from its local shard (no
    communication); its dtype is kept (fp32 master weights and moments of bf16 parameters)."""
    value = value.to(device=like.device)
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(value, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    return value


def _optimizer_meta(reader: CheckpointReader, rank: int, same_layout: bool, optimizer: torch.optim.Optimizer,
                    names: dict[int, str]) -> dict[str, Any]:  # fmt: skip
    """The saved optimizer metadata for this rank's groups. In the saved layout, this rank's own; in another, each
    live group takes the hyperparameters of the saved group (on whichever rank) that held its parameters."""
    own = reader.rank_objects(rank) if same_layout else None
    if own is not None and own.get("optim"):
        return own["optim"]
    if same_layout:
        return reader.objects()["optim"]
    saved_group: dict[str, dict[str, Any]] = {}
    scalars: dict[str, Any] = {}
    for r in reader.saved_ranks():
        meta = (reader.rank_objects(r) or {}).get("optim") or {}
        for group in meta.get("param_groups", []):
            for n in group["params"]:
                saved_group[n] = group
        scalars.update(meta.get("scalars", {}))
    groups = []
    for live in optimizer.param_groups:
        live_names = [names[id(p)] for p in live["params"]]
        found = [saved_group[n] for n in live_names if n in saved_group]
        if not found:
            raise KeyError(f"checkpoint has no optimizer state for parameter {live_names[0]}")
        hyper = {k: v for k, v in found[0].items() if k not in ("params", "names")}
        if any({k: v for k, v in g.items() if k not in ("params", "names")} != hyper for g in found):
            raise KeyError(f"one optimizer group ({live_names[0]}, ...) mixes saved hyperparameters")
        groups.append({**hyper, "params": live_names})
    return {"param_groups": groups, "scalars": {n: v for n, v in scalars.items() if n in set(names.values())}}


@torch.no_grad()
def restore_training_state(
    reader: CheckpointReader, *, chunks: Sequence[nn.Module], optimizer: torch.optim.Optimizer,
    sharding: ShardingRegistry, scaler: Any, rng_trackers: Sequence[Any], device: torch.device,
    layout: dict[str, Any], rank: int,
) -> tuple[int, int]:  # fmt: skip
    """Loads this rank's regions of a checkpoint's tensors (whatever layout saved them) into its parameters and
    optimizer, the loss scaler and, when the layout is the saved one, this rank's RNG states and fp8 histories;
    returns (step, consumed samples). A tied copy takes the embedding's tensors."""
    params, aliases = _named_parameters(chunks)
    saved = set(reader.names("model"))
    needed = {aliases.get(n, n) for n in params}
    missing = sorted(needed - saved)
    whole = len(chunks) == 1 and all(getattr(chunks[0], k, None) is not None for k in ("tok_emb", "output"))
    unexpected = sorted(saved - needed) if whole else []  # a pipeline stage holds only its own part
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {reader.path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    regions = {}
    for name, p in params.items():
        source = aliases.get(name, name)
        full, offsets, shape = regions[name] = _region(name, p, sharding.get(name))
        if reader.shape(source) != full:
            raise CheckpointError(
                f"checkpoint {reader.path} does not fit this model: {name} has shape {reader.shape(source)}, "
                f"the model's {full}"
            )
        _local_part(p).copy_(reader.read(source, offsets, shape))
    holders: dict[str, list[str]] = {}  # saved parameter name -> the live parameters taking its optimizer state
    for name in params:
        holders.setdefault(aliases.get(name, name), []).append(name)
    optim = {}
    for key in reader.names("optim"):
        source, state = _param_of(key), key.rpartition(".")[2]
        for name in holders.get(source, []):
            full, offsets, shape = regions[name]
            if reader.shape(key) == full:  # per-element state: this rank's region, placed as the parameter
                optim[f"optim.{name}.{state}"] = _placed(reader.read(key, offsets, shape), params[name])
            else:  # a scalar (AdamW's step) or a factored statistic: whole
                optim[f"optim.{name}.{state}"] = reader.read(key)
    same_layout = _layout_key(reader.manifest.get("layout", {})) == _layout_key(layout)
    names = {id(p): n for n, p in params.items()}
    try:
        meta = _optimizer_meta(reader, rank, same_layout, optimizer, names)
        named_to_optimizer_state(optimizer, names, optim, meta)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().strip("'").splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {reader.path} does not fit this optimizer: {first}") from None
    objects = reader.objects()
    if scaler is not None and objects.get("scaler"):
        scaler.load_state_dict(objects["scaler"])
    mine = reader.rank_objects(rank) if same_layout else None
    if mine is not None:  # the same rank at the same place in the same layout (else fresh seeds)
        restore_rng_state(mine["rng"], device)
        load_fp8_state(chunks, mine.get("fp8"))
        for tracker, states in zip(rng_trackers, mine.get("rng_tracker") or []):
            if states and tracker is not None:
                tracker.set_states({k: tuple(v) for k, v in states.items()})
    step, consumed = reader.step, int(reader.manifest["consumed_samples"])
    reader.close()  # the memory maps
    return step, consumed
