"""The registry of how each parameter is sharded, keyed by canonical fully qualified name.

One `ParamSharding` per parameter: its global (unpadded) shape, the dimension it is split along (None: replicated),
this rank's index among the shards and their number, the padded size along that dimension (an odd vocabulary is
padded to a multiple of tp with zero rows), and whether its gradient is a per-rank partial sum over tp (applied to
sequence shards under sequence parallelism, or a kv projection replicated over more ranks than kv heads). Keys are
canonical names (`engine.model.init.canonical_name`: wrapper segments of DDP, torch.compile, activation
checkpointing and FSDP removed), so the registry survives any wrapper and the parameters themselves carry nothing.
Initialisation, gradient finishing, clipping norms and checkpoint slicing all read it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from engine.model.init import canonical_name, root_attribute


@dataclass(frozen=True)
class ParamSharding:
    """How one parameter is laid out over the ranks of its tensor-parallel group."""

    global_shape: tuple[int, ...]
    dim: int | None = None  # partition dimension; None: every rank holds the whole tensor
    rank: int = 0
    size: int = 1
    padded: int | None = None  # padded extent along `dim` (a multiple of `size`); None: global_shape[dim]
    sequence_parallel: bool = False  # applied to sequence shards: its gradient is a partial sum over tp
    partial_grad: bool = False  # replicated, but each rank's gradient is a partial sum over tp

    @property
    def sharded(self) -> bool:
        return self.dim is not None and self.size > 1

    @property
    def grad_needs_tp_sum(self) -> bool:
        return self.sequence_parallel or self.partial_grad

    @property
    def local_shape(self) -> tuple[int, ...]:
        if not self.sharded:
            return self.global_shape
        shape = list(self.global_shape)
        shape[self.dim] = self._padded // self.size
        return tuple(shape)

    @property
    def _padded(self) -> int:
        return self.global_shape[self.dim] if self.padded is None else self.padded

    def shard_range(self) -> tuple[int, int, int]:
        """(dim, start, rows): this rank's first `rows` rows along `dim` are rows `start` onwards of the full unpadded
        tensor; local rows past `rows` are padding (zero), all of them when `rows` is 0."""
        if not self.sharded:
            return 0, 0, self.global_shape[0] if self.global_shape else 1
        per = self._padded // self.size
        start = self.rank * per
        return self.dim, start, max(0, min(per, self.global_shape[self.dim] - start))

    def offsets(self) -> list[int]:
        """This shard's offset in the full tensor, per dimension (a checkpoint manifest's shard offsets)."""
        out = [0] * len(self.global_shape)
        if self.sharded:
            dim, start, _ = self.shard_range()
            out[dim] = start
        return out

    def local_from_full(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full unpadded tensor, padding rows zero (a view-free copy for sharded ones)."""
        if tuple(full.shape) != tuple(self.global_shape):
            raise ValueError(f"full tensor has shape {tuple(full.shape)}, the parameter's is {self.global_shape}")
        if not self.sharded:
            return full
        dim, start, rows = self.shard_range()
        out = full.new_zeros(self.local_shape)
        if rows > 0:
            out.narrow(dim, 0, rows).copy_(full.narrow(dim, start, rows))
        return out

    def valid_local(self, local: torch.Tensor) -> torch.Tensor:
        """The rows of a local shard that belong to the full tensor (padding dropped); all of a replicated one."""
        if not self.sharded:
            return local
        dim, _, rows = self.shard_range()
        return local.narrow(dim, 0, rows)


class ShardingRegistry:
    """canonical parameter name -> ParamSharding; a name it does not hold is a replicated parameter."""

    def __init__(self, entries: dict[str, ParamSharding] | None = None, tp_group=None):
        self.tp_group = tp_group  # the group sharded parameters are split over (None: no tensor parallelism)
        self.attached = False  # set when recorded on a model (`attach_sharding`)
        self._entries: dict[str, ParamSharding] = {}
        for name, spec in (entries or {}).items():
            self._entries[canonical_name(name)] = spec

    @classmethod
    def merge(cls, registries: list[ShardingRegistry]) -> ShardingRegistry:
        """One registry over several model chunks (a rank's pipeline stages; their names are distinct)."""
        out = cls(tp_group=next((r.tp_group for r in registries if r.tp_group is not None), None))
        for r in registries:
            out._entries.update(r._entries)
        return out

    def get(self, name: str) -> ParamSharding | None:
        return self._entries.get(canonical_name(name))

    def __getitem__(self, name: str) -> ParamSharding:
        spec = self.get(name)
        if spec is None:
            raise KeyError(f"no sharding recorded for parameter {name!r}")
        return spec

    def __contains__(self, name: str) -> bool:
        return canonical_name(name) in self._entries

    def items(self) -> Iterator[tuple[str, ParamSharding]]:
        return iter(self._entries.items())

    def is_sharded(self, name: str) -> bool:
        spec = self.get(name)
        return spec is not None and spec.sharded

    def named(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter, ParamSharding | None]]:
        """(canonical name, parameter, its sharding or None) over `model`'s unique parameters, in module order."""
        for name, p in model.named_parameters():
            cname = canonical_name(name)
            yield cname, p, self._entries.get(cname)


def collect_sharding(
    model: nn.Module, sequence_parallel_modules: frozenset[str] = frozenset(), tp_group=None
) -> ShardingRegistry:
    """A registry for `model` from its parallel layers (any module with `param_shardings()`); parameters of the
    modules named in `sequence_parallel_modules` (canonical names) are marked sequence-parallel; others replicated."""
    entries: dict[str, ParamSharding] = {}
    for mname, module in model.named_modules():
        cm = canonical_name(mname)
        if hasattr(module, "param_shardings"):
            for pname, spec in module.param_shardings().items():
                entries[f"{cm}.{pname}" if cm else pname] = spec
        elif cm in sequence_parallel_modules:
            for pname, p in module.named_parameters(recurse=False):
                entries[f"{cm}.{pname}" if cm else pname] = ParamSharding(tuple(p.shape), sequence_parallel=True)
    return ShardingRegistry(entries, tp_group)


_ATTRIBUTE = "parallel_sharding"


def attach_sharding(model: nn.Module, registry: ShardingRegistry) -> None:
    """Records `registry` on the model root (one attribute of the module, found through wrappers by `sharding_of`)."""
    registry.attached = True
    object.__setattr__(model, _ATTRIBUTE, registry)


def sharding_of(model: nn.Module) -> ShardingRegistry:
    """The registry a parallelizer attached to `model` (looked up through DDP's `.module` and torch.compile's
    `_orig_mod`), or an empty one: every parameter replicated."""
    return root_attribute(model, _ATTRIBUTE) or ShardingRegistry()
