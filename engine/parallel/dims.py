"""ParallelDims: the sizes of a parallel layout, what is enabled, and its process groups built on demand.

World = dp_replicate x dp_shard x pp x cp x tp, tp fastest (a tensor-parallel group on consecutive ranks, one node;
Narayanan et al. 2021, sec. 3.3); dp_replicate is what is left. A trainer builds one and passes it explicitly to
`parallelize_gpt` and the step; the module-level grid in state.py is only a default for embedders that call
`engine.parallel.initialize`. Groups are made the first time they are asked for (every rank of the job must ask for
the same kinds in the same order, as c10d requires of `new_group`), so a layout never builds groups it does not use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from engine.parallel.state import KINDS, Coords, Grid, LayoutError, build_grid


@dataclass
class ParallelDims:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp_shard: int = 1
    world_size: int = 1
    rank: int = 0
    grid: Grid = field(init=False, repr=False)
    _groups: dict[str, dist.ProcessGroup] = field(default_factory=dict, init=False, repr=False)
    _owned: list[dist.ProcessGroup] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.grid = build_grid(self.world_size, self.tp, self.pp, self.cp, self.dp_shard)
        if not 0 <= self.rank < self.world_size:
            raise LayoutError(f"rank {self.rank} is outside the world of {self.world_size} ranks")

    @classmethod
    def from_world(cls, tp: int = 1, pp: int = 1, cp: int = 1, dp_shard: int = 1) -> ParallelDims:
        """The layout over the initialised default process group (its size and this rank)."""
        if not dist.is_initialized():
            raise LayoutError("ParallelDims.from_world needs torch.distributed initialised first")
        return cls(tp, pp, cp, dp_shard, dist.get_world_size(), dist.get_rank())

    # -- sizes and flags --
    @property
    def dp_replicate(self) -> int:
        return self.grid.dp_replicate

    @property
    def dp(self) -> int:
        """The whole data-parallel degree (dp_replicate x dp_shard)."""
        return self.grid.dp

    @property
    def coords(self) -> Coords:
        return self.grid.coords(self.rank)

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def dp_shard_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    def size(self, kind: str) -> int:
        return len(self.grid.group_of(kind, self.rank))

    def rank_in(self, kind: str) -> int:
        return self.grid.group_of(kind, self.rank).index(self.rank)

    def as_dict(self) -> dict[str, int]:
        return {"world_size": self.world_size, "dp": self.dp, "tp": self.tp, "pp": self.pp, "cp": self.cp,
                "dp_shard": self.dp_shard}  # fmt: skip

    # -- process groups --
    def group(self, kind: str) -> dist.ProcessGroup:
        """This rank's process group of one kind (see state.KINDS), built on first use; None for the embedding group
        of a middle pipeline stage."""
        if kind not in KINDS:
            raise LayoutError(f"unknown group kind {kind!r}; expected one of {', '.join(KINDS)}")
        if kind == "embedding" and kind not in self._groups:
            # the first and last stage of each pipeline (not a partition: middle stages are in none)
            mine = None
            for members in self.grid.groups("embedding"):
                group = dist.new_group(members)  # every rank takes part in making every group
                if self.rank in members:
                    mine = group
                    self._owned.append(group)
            self._groups[kind] = mine
        if kind not in self._groups:
            members = self.grid.groups(kind)
            if len(members) == 1 and len(members[0]) == dist.get_world_size():
                self._groups[kind] = dist.group.WORLD
            else:
                mine, _ = dist.new_subgroups_by_enumeration(members)
                self._groups[kind] = mine
                self._owned.append(mine)
        return self._groups[kind]

    def destroy(self) -> None:
        """Destroys the groups this object made (not the default group)."""
        for g in self._owned:
            if dist.is_initialized():
                dist.destroy_process_group(g)
        self._owned.clear()
        self._groups.clear()
