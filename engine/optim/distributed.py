"""ZeRO-1: the optimizer state sharded over the data-parallel group (Rajbhandari et al. 2020, stage 1; Megatron-Core's
DistributedOptimizer).

The gradient buffers (engine.parallel.data_parallel) give each rank a contiguous shard of every bucket, which can
cut through parameters. The rank's optimizer runs on 1-D pieces: for each parameter overlapping its shards, the
overlapping part of the parameter's data (a view into the parameter buffer, so an update lands in the model) with
the matching part of the reduce-scattered gradient as its `.grad`. AdamW is elementwise, so stepping the pieces
is stepping the whole tensors; each piece keeps its parameter's group (weight decay or not). After the step the
buffers all-gather the updated shards. Per parameter of fp32 training: 4 bytes of data + 4 of gradient + 8 / dp of
Adam state, against 16 without sharding. Adafactor's factored second moment needs whole matrices: not shardable.

To the rest of the engine this is an optimizer over the model's parameters: `param_groups` shows them (the learning
rate schedule writes through to the pieces' groups), and `state_dict` / `load_state_dict` hold each parameter's whole
state (gathered to the group's rank 0, the one that writes, to save; cut to this rank's pieces on load), so
checkpoints keep the global view and load at another dp. A parameter without a gradient in a step still takes the
update of its zero gradient (momentum, weight decay), as in Megatron's distributed optimizer.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.config import ConfigError, OptimConfig
from engine.optim.build import build_optimizer, optimizer_for_groups, param_groups
from engine.parallel.data_parallel import Bucket, GradBuffers, grad_buffers_of


class _GroupView(MutableMapping):
    """A param group as the engine sees it: the model's parameters under "params", every other key the inner
    optimizer's group (so a learning-rate change reaches the pieces)."""

    def __init__(self, inner: dict, params: list[nn.Parameter]) -> None:
        self.inner, self.params = inner, params

    def __getitem__(self, key: str) -> Any:
        return self.params if key == "params" else self.inner[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "params":
            raise KeyError("a ZeRO-1 param group's parameters are fixed")
        self.inner[key] = value

    def __delitem__(self, key: str) -> None:
        del self.inner[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


@dataclass
class _Piece:
    """The part [lo, hi) of a parameter's flattened data that this rank's shard of its bucket holds."""

    param: nn.Parameter
    bucket: Bucket
    start: int  # the parameter's offset in the bucket
    lo: int
    hi: int
    data: torch.Tensor  # what the inner optimizer steps: the 1-D view of the parameter data, or its fp32 master copy
    view: torch.Tensor  # the 1-D view of the bucket's parameter data (written from `data` after a step if a copy)


class DistributedOptimizer:
    """The optimizer of `cfg` over this rank's pieces of `model`'s parameters (see the module docstring)."""

    def __init__(self, model: nn.Module, cfg: OptimConfig, buffers: GradBuffers) -> None:
        if cfg.name != "adamw":
            raise ConfigError(
                f"parallel.zero1 shards AdamW's elementwise state; optim.name {cfg.name} keeps factored statistics "
                "of whole matrices and cannot be sharded: use optim.name adamw or parallel.zero1 false"
            )
        self.buffers, self.group = buffers, buffers.group
        rank, size = buffers.rank, buffers.size
        where = {id(p): (b, s, e) for b in buffers.buckets for p, (s, e) in zip(b.params, b.ranges)}
        self.pieces: list[_Piece] = []
        groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
        inner_groups = []
        for g in groups:
            mine = []
            for p in g["params"]:
                b, s, e = where[id(p)]
                n = b.param_data.numel() // size
                lo, hi = max(s, rank * n), min(e, (rank + 1) * n)
                if lo < hi:
                    view = b.param_data[lo:hi]
                    # fp32 parameters are their own master weights; bf16 ones get an fp32 copy of this shard
                    piece = view if view.dtype == torch.float32 else view.float()
                    piece.grad = b.grad_data[lo:hi]
                    self.pieces.append(_Piece(p, b, s, lo - s, hi - s, piece, view))
                    mine.append(piece)
            inner_groups.append({**{k: v for k, v in g.items() if k not in ("params", "names")}, "params": mine})
        self.inner = optimizer_for_groups(inner_groups, cfg)
        self.param_groups = [_GroupView(ig, g["params"]) for ig, g in zip(self.inner.param_groups, groups)]
        self.shards = [pc.data for pc in self.pieces]  # what this rank clips and steps

    def shards_of(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """This rank's pieces of `params` (e.g. the parameters a rank counts in the global gradient norm)."""
        ids = {id(p) for p in params}
        return [pc.data for pc in self.pieces if id(pc.param) in ids]

    def step(self) -> None:
        self.buffers.wait_params()  # a previous step's gathers, if no forward has waited for them
        self.inner.step()
        for pc in self.pieces:
            if pc.data is not pc.view:
                pc.view.copy_(pc.data)  # the master's update rounded once into the bf16 parameter
        self.buffers.all_gather_params(wait=False)  # overlapped with the next forward (its pre-hooks wait)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.buffers.zero_grad()  # the gradients are views into the buffers: zeroed, never dropped

    # -- checkpoints: each parameter's whole state ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's layout (state by parameter index). The group's rank 0, the one that writes checkpoints, gets
        every parameter's whole state, gathered bucket by bucket into host memory; the other ranks get the groups
        only. A collective: every rank of the group calls it."""
        self.buffers.wait_params()
        params = [p for g in self.param_groups for p in g["params"]]
        index = {id(p): i for i, p in enumerate(params)}
        local = {}  # the state's keys and 0-dim values (AdamW's step), the same for every piece that has stepped
        for st in self.inner.state.values():
            local = {k: (None if v.dim() > 0 else v.detach().cpu().clone()) for k, v in st.items()}
            break
        if local and any(pc.data is not pc.view for pc in self.pieces):
            local["master"] = None  # bf16 parameters: their fp32 master weights are optimizer state too
        everyone: list[dict] = [{} for _ in range(self.buffers.size)]
        dist.all_gather_object(everyone, local, group=self.group)  # every rank then loops over the same keys
        merged = next((d for d in everyone if d), {})
        state: dict[int, dict[str, Any]] = {}
        rank, size = self.buffers.rank, self.buffers.size
        root = dist.get_global_rank(self.group, 0)
        in_bucket: dict[int, list[_Piece]] = {}
        for pc in self.pieces:
            in_bucket.setdefault(id(pc.bucket), []).append(pc)
        for key in sorted(k for k, v in merged.items() if v is None):
            for b in self.buffers.buckets:
                n = b.param_data.numel() // size
                shard = torch.zeros(n, dtype=torch.float32, device=b.param_data.device)
                for pc in in_bucket.get(id(b), []):
                    value = pc.data.detach() if key == "master" else self.inner.state.get(pc.data, {}).get(key)
                    if value is not None:
                        shard[pc.start + pc.lo - rank * n : pc.start + pc.hi - rank * n].copy_(value)
                parts = [torch.empty_like(shard) for _ in range(size)] if rank == 0 else None
                dist.gather(shard, parts, dst=root, group=self.group)
                if rank != 0:
                    continue
                flat = torch.cat(parts).cpu()
                for p, (s, e) in zip(b.params, b.ranges):
                    # each parameter its own copy of the scalars: AdamW increments its step in place
                    entry = state.setdefault(index[id(p)], {k: v.clone() for k, v in merged.items() if v is not None})
                    entry[key] = flat[s:e].view_as(p).clone()  # fp32, also for bf16 parameters
        groups = [
            {**{k: v for k, v in g.inner.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
            for g in self.param_groups
        ]
        return {"state": state, "param_groups": groups}

    def shard_state(self) -> list[tuple[nn.Parameter, int, int, dict[str, torch.Tensor]]]:
        """This rank's pieces with their state, without communication: (parameter, lo, hi, {key: 1-D state of
        elements lo..hi-1 of the flattened parameter, or a 0-dim scalar}), bf16 parameters' fp32 masters as
        `master`. What a sharded checkpoint writes."""
        out = []
        for pc in self.pieces:
            st = dict(self.inner.state.get(pc.data, {}))
            if pc.data is not pc.view and st:
                st["master"] = pc.data
            out.append((pc.param, pc.lo, pc.hi, st))
        return out

    def group_hyperparameters(self) -> list[dict[str, Any]]:
        """Each param group's hyperparameters (torch's state_dict groups without their parameter indices)."""
        return [{k: v for k, v in g.inner.items() if k != "params"} for g in self.param_groups]

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Takes `state_dict`'s layout (each parameter's whole state) and loads this rank's pieces of it."""
        params = [p for g in self.param_groups for p in g["params"]]
        by_param = {id(params[i]): st for i, st in sd["state"].items()}
        pieces = {
            id(pc.param): {
                k: v.detach().reshape(-1)[pc.lo : pc.hi] if v.dim() > 0 else v
                for k, v in (by_param.get(id(pc.param)) or {}).items()
            }
            for pc in self.pieces
        }
        self.load_shard_state(pieces, [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]])

    def load_shard_state(
        self, state: dict[int, dict[str, torch.Tensor]], hyperparameters: list[dict[str, Any]]
    ) -> None:
        """Loads this rank's pieces as `shard_state` gives them (keyed by the parameter's id: the 1-D state of its
        piece or 0-dim scalars, `master` for bf16 parameters) and each group's hyperparameters, through the inner
        optimizer's own load_state_dict (which puts each value on its piece's device, as its kernel wants). What a
        sharded checkpoint reads, one piece at a time."""
        position = {id(t): i for i, t in enumerate(t for g in self.inner.param_groups for t in g["params"])}
        inner_state: dict[int, dict[str, Any]] = {}
        for pc in self.pieces:
            st = dict(state.get(id(pc.param)) or {})
            master = st.pop("master", None)
            if pc.data is not pc.view:  # the fp32 master: saved, else the (just loaded) bf16 parameter
                pc.data.copy_(master if master is not None else pc.view)
            if st:
                inner_state[position[id(pc.data)]] = {k: v.detach().clone() for k, v in st.items()}
        groups = [
            {**hyper, "params": [position[id(t)] for t in live["params"]]}
            for hyper, live in zip(hyperparameters, self.inner.param_groups)
        ]
        self.inner.load_state_dict({"state": inner_state, "param_groups": groups})
        for view, group in zip(self.param_groups, self.inner.param_groups):  # torch made new group dicts
            view.inner = group

    def state_bytes(self) -> int:
        """Bytes of per-element optimizer state on this rank (AdamW's moments; not its scalar step counts)."""
        return sum(v.numel() * v.element_size() for st in self.inner.state.values() for v in st.values() if v.dim())


def build_training_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer | DistributedOptimizer:
    """The optimizer of a training run: a DistributedOptimizer over this rank's shards when parallelize_gpt moved the
    parameters into ZeRO-1's buffers, else `build_optimizer`'s."""
    buffers = next((b for m in model.modules() if (b := grad_buffers_of(m)) is not None), None)
    if buffers is not None and buffers.zero1:
        return DistributedOptimizer(model, cfg, buffers)
    return build_optimizer(model, cfg)
