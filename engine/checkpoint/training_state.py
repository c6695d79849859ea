"""The training state a checkpoint holds, saved and restored over any layout: model and optimizer tensors by
canonical parameter name, the loss scaler, per-rank RNG states and fp8 histories, and caller metadata.

Saving: each rank writes the regions it holds and no other rank holds too: its tensor-parallel rows (padding
dropped) when tp rank or the tensor's sharding says so, under FSDP2 its shard of them (the first replica's ranks),
replicated tensors once (tp rank 0 of data-parallel rank 0); every region is recorded with its place in the whole
tensor. Nothing is gathered that a rank does not hold, except whole DTensor statistics of another shape.
Loading: each rank reads its regions from memory-mapped shard files (`CheckpointReader`), whatever layout saved
them; the optimizer groups are rebuilt from the saved ranks' when the layout changed; per-rank state (RNG streams,
fp8 amax histories) is restored only into the layout that saved it. Used by the trainer (`engine.training.resume`)
and by `engine.checkpoint.api` for other trainers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.checkpoint.async_saver import AsyncSaver, stage_tree
from engine.checkpoint.checkpointer import CheckpointError, save_checkpoint
from engine.checkpoint.reader import CheckpointReader
from engine.checkpoint.state import (
    IMPLEMENTATION_KEYS,
    capture_rng_state,
    full_tensor,
    named_to_optimizer_state,
    optimizer_state_to_named,
    restore_rng_state,
)
from engine.model.init import canonical_name
from engine.parallel.data_parallel import grad_buffers_of
from engine.parallel.sharding import ShardingRegistry
from engine.precision.fp8 import fp8_state, load_fp8_state


def layout_text(layout: dict[str, Any]) -> str:
    keys = ("world_size", "dp", "tp", "sp", "pp", "virtual_stages", "cp", "dp_shard")
    return " ".join(f"{k}={layout[k]}" for k in keys if k in layout)


def agreed(problem: str | None) -> str | None:
    """The first rank's problem with a checkpoint, the same on every rank (a collective when distributed)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return problem
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problem)
    return next((p for p in everyone if p is not None), None)


def layout_key(layout: dict[str, Any]) -> tuple:
    """What makes two layouts hold the same per-rank state (RNG streams, fp8 histories, optimizer groups)."""
    keys = ("world_size", "dp", "tp", "pp", "virtual_stages", "cp", "dp_shard")
    return tuple(layout.get(k, 1) for k in keys)


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
    toml: str, keep: int, tp_rank: int, dp_rank: int, saver: AsyncSaver | None = None, extra: Any = None,
) -> Path | None:  # fmt: skip
    """Writes checkpoint `step` (a collective over every rank; see module docstring for who writes what), or with
    `saver` stages this rank's part in host memory and writes it in the background (returns None). `chunks`: this
    rank's model chunks (one without pipeline parallelism); `dp_rank`: its rank among the replicas of its
    non-FSDP2 tensors (dp x cp); `optimizer` may be None; `extra` (weights_only-loadable) is saved as is."""
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
    otensors, ometa = {}, {"param_groups": [], "scalars": {}}
    zero1 = hasattr(optimizer, "shard_state")  # ZeRO-1: each rank writes its own pieces (flat shards)
    if zero1:
        groups = zip(optimizer.group_hyperparameters(), optimizer.param_groups)
        ometa["param_groups"] = [{**h, "params": [names[id(p)] for p in g["params"]]} for h, g in groups]
    elif optimizer is not None:
        otensors, ometa = optimizer_state_to_named(optimizer, names, gather=False)
    tensors = {"model": {n: p.detach() for n, p in params.items()}, "optim": otensors}
    out: dict[str, dict[str, torch.Tensor]] = {}
    shards: dict[str, tuple[list[int], list[int]]] = {}
    for group_name, named in tensors.items():
        out[group_name] = {}
        for key, value in named.items():
            name = _param_of(key) if group_name == "optim" else key
            if name in aliases:
                continue  # a tied copy: its values and state are the embedding's
            p, spec = params.get(name), sharding.get(name)
            distributed = hasattr(value, "device_mesh")
            if p is None or value.dim() == 0 or tuple(value.shape) != tuple(p.shape):
                # A scalar (AdamW's step) or a factored statistic: whole, written once.
                value = full_tensor(value)
                if tp_rank == 0 and dp_rank == 0:
                    out[group_name][key] = value
                continue
            # This rank's region: its tp rows and within them its FSDP2 shard; written by one rank per region
            # (tp ranks hold different rows, FSDP2 ranks of the first replica different shards).
            if not (spec is not None and spec.sharded) and tp_rank != 0:
                continue
            if (_replica_rank(value) if distributed else dp_rank) != 0:
                continue
            full, offsets, shape = _region(name, p, spec)
            valid = [max(0, min(n, f - o)) for o, n, f in zip(offsets, shape, full)]  # tp's vocabulary padding off
            if 0 in valid and math.prod(shape) > 0:
                continue  # nothing but padding
            out[group_name][key] = _local_part(value)[tuple(slice(0, v) for v in valid)]
            if list(valid) != list(full):
                shards[key] = (list(full), offsets)
    if zero1:
        _zero1_pieces(optimizer, names, aliases, sharding, tp_rank, out["optim"], shards)
    objects = {"optim": ometa, "scaler": scaler.state_dict() if scaler is not None else None, "extra": extra}
    rank_objects = {
        "rng": capture_rng_state(device),
        "rng_tracker": [t.get_states() if t is not None else None for t in rng_trackers],
        "fp8": fp8_state(chunks),  # delayed scaling's amax histories: a resumed run scales as the straight one
        "optim": ometa,  # each pipeline stage's optimizer holds its own parameters
    }
    kwargs = dict(meta=meta, texts={"config.toml": toml} if toml else {}, keep=keep, shards=shards, write_tensors=True)
    if saver is None:
        return save_checkpoint(root, step, tensors=out, objects=objects, rank_objects=rank_objects, **kwargs)
    out, objects, rank_objects = stage_tree((out, objects, rank_objects))
    group = saver.group()  # before staging: a collective every rank makes here
    saver.submit(step, lambda: save_checkpoint(root, step, tensors=out, objects=objects, rank_objects=rank_objects,
                                               group=group, **kwargs))  # fmt: skip
    return None


def _zero1_pieces(optimizer: Any, names: dict[int, str], aliases: dict[str, str], sharding: ShardingRegistry,
                  tp_rank: int, out: dict[str, torch.Tensor], shards: dict[str, tuple]) -> None:  # fmt: skip
    """ZeRO-1's optimizer state as this rank holds it: for each piece (elements lo..hi-1 of a parameter's flattened
    tensor-parallel slice), a flat shard of that slice's box; a scalar (AdamW's step) from the first piece of tp rank
    0's slice only."""
    for p, lo, hi, state in optimizer.shard_state():
        name = names[id(p)]
        spec = sharding.get(name)
        if name in aliases or (not (spec is not None and spec.sharded) and tp_rank != 0):
            continue  # a tied copy, or a replicated parameter whose pieces tp rank 0 writes
        full, offsets, shape = _region(name, p, spec)
        valid = [max(0, min(n, f - o)) for o, n, f in zip(offsets, shape, full)]
        if valid[1:] != shape[1:]:
            raise CheckpointError(f"ZeRO-1 cannot checkpoint {name}: its padding is not along dimension 0")
        end = math.prod(valid)  # padding rows come last: the valid elements are a prefix of the flattened slice
        a, b = min(lo, end), min(hi, end)
        for key, value in state.items():
            k = f"optim.{name}.{key}"
            if value.dim() == 0:
                if lo == 0 and tp_rank == 0:  # one copy of the parameter's step count
                    out[k] = value
            elif a < b:
                out[k] = value[a - lo : b - lo]
                shards[k] = (list(full), offsets, valid, (a, b))


def _load_zero1(optimizer: Any, names: dict[int, str], optim: dict[Any, Any], meta: dict[str, Any]) -> None:
    """ZeRO-1's pieces (`optim[id(param)]`: state name -> 1-D piece) and scalars (`optim["optim.<name>.<state>"]`)
    into its optimizer, the saved hyperparameters over each live group's (implementation keys stay this run's)."""
    ids = {n: i for i, n in names.items()}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in optim.items():
        if isinstance(key, int):
            state.setdefault(key, {}).update(value)
        else:
            name, _, s = key[len("optim.") :].rpartition(".")
            state.setdefault(ids[name], {})[s] = value
    by_name = {n: g for g in meta["param_groups"] for n in g["params"]}
    hyper = []
    for live in optimizer.param_groups:
        saved = by_name[names[id(live["params"][0])]]
        h = dict(live.inner) if hasattr(live, "inner") else dict(live)
        h.update({k: v for k, v in saved.items() if k in h and k != "params" and k not in IMPLEMENTATION_KEYS})
        hyper.append({k: v for k, v in h.items() if k != "params"})
    optimizer.load_shard_state(state, hyper)


def _replica_rank(t: torch.Tensor) -> int:
    """For a DTensor, 0 on the ranks of its first replica (coordinate 0 on every mesh dimension it is replicated
    over, e.g. HSDP's dp_replicate), else 1: one replica writes the shards."""
    coordinate = t.device_mesh.get_coordinate() or []
    return int(any(c != 0 for c, pl in zip(coordinate, t.placements) if pl.is_replicate()))


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
    reader: CheckpointReader, *, chunks: Sequence[nn.Module], optimizer: torch.optim.Optimizer | None,
    sharding: ShardingRegistry, scaler: Any, rng_trackers: Sequence[Any], device: torch.device,
    layout: dict[str, Any], rank: int, whole: bool | None = None,
) -> tuple[int, int]:  # fmt: skip
    """Loads this rank's regions of a checkpoint's tensors (whatever layout saved them) into its parameters and
    optimizer, the loss scaler and, when the layout is the saved one, this rank's RNG states and fp8 histories;
    returns (step, consumed samples). A tied copy takes the embedding's tensors."""
    params, aliases = _named_parameters(chunks)
    saved = set(reader.names("model"))
    needed = {aliases.get(n, n) for n in params}
    missing = sorted(needed - saved)
    if whole is None:  # a GPT model with its embedding and head: not one pipeline stage's part
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
    zero1 = hasattr(optimizer, "load_shard_state")  # ZeRO-1 reads only its pieces (flat ranges of its regions)
    pieces: dict[int, tuple[int, int]] = {id(p): (lo, hi) for p, lo, hi, _ in optimizer.shard_state()} if zero1 else {}
    optim: dict[str, Any] = {}
    for key in reader.names("optim"):
        source, state = _param_of(key), key.rpartition(".")[2]
        for name in holders.get(source, []):
            full, offsets, shape = regions[name]
            p = params[name]
            if reader.shape(key) != full:  # a scalar (AdamW's step) or a factored statistic: whole
                optim[f"optim.{name}.{state}"] = reader.read(key)
            elif zero1:
                if id(p) in pieces:
                    optim.setdefault(id(p), {})[state] = reader.read_flat(key, offsets, shape, *pieces[id(p)])
            else:  # per-element state: this rank's region, placed as the parameter
                optim[f"optim.{name}.{state}"] = _placed(reader.read(key, offsets, shape), p)
    same_layout = layout_key(reader.manifest.get("layout", {})) == layout_key(layout)
    names = {id(p): n for n, p in params.items()}
    try:
        if optimizer is not None:
            meta = _optimizer_meta(reader, rank, same_layout, optimizer, names)
            if zero1:
                _load_zero1(optimizer, names, optim, meta)
            else:
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
    step, consumed = reader.step, int(reader.manifest.get("consumed_samples", 0))
    reader.close()  # the memory maps
    return step, consumed
