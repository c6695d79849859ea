"""The process-group grid: ranks laid out as dp x pp x cp x tp, tp fastest; the project's only global state.

tp is the fastest axis so a tensor-parallel group sits on consecutive ranks (one node), as in Megatron-LM
(Shoeybi et al. 2019, sec. 3; Narayanan et al. 2021, sec. 3.3). dp is what is left of the world once tp, pp and cp
are taken; it splits further into dp_replicate x dp_shard (dp_shard fastest), the FSDP/HSDP layout.

`build_grid` is pure: it computes coordinates and every group's member list without any process group, so the
layout is unit-testable in one process. `initialize` builds every `torch.distributed` group once (every rank
calls `new_group` for every group, in the same order, as c10d requires) and keeps the ones this rank is in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

# Group kinds. Each is a set of grid axes: a group holds the ranks that differ only along those axes.
AXES = ("dp_replicate", "dp_shard", "pp", "cp", "tp")  # slowest to fastest
GROUP_AXES: dict[str, tuple[str, ...]] = {
    "tp": ("tp",),
    "pp": ("pp",),
    "cp": ("cp",),
    "dp": ("dp_replicate", "dp_shard"),  # the whole data-parallel group (gradient reduction without cp)
    "dp_shard": ("dp_shard",),  # FSDP sharding group
    "dp_replicate": ("dp_replicate",),  # HSDP replication group
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),  # gradient reduction when cp > 1 (cp ranks hold the same weights)
    "tp_cp": ("tp", "cp"),
    "model_parallel": ("tp", "pp"),  # ranks holding different weight shards (global grad norm)
}
KINDS = (*GROUP_AXES, "embedding")


class LayoutError(ValueError):
    """An impossible parallel layout; the message is one line."""


@dataclass(frozen=True)
class Coords:
    """A rank's position on the grid. `dp` is the flat data-parallel index, dp_replicate * dp_shard_size + dp_shard."""

    dp_replicate: int
    dp_shard: int
    pp: int
    cp: int
    tp: int
    dp: int


@dataclass(frozen=True)
class Grid:
    """The layout of `world_size` ranks as (dp_replicate, dp_shard, pp, cp, tp), row-major, tp fastest."""

    world_size: int
    tp: int
    pp: int
    cp: int
    dp_shard: int
    dp_replicate: int
    _groups: dict[str, list[list[int]]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def dp(self) -> int:
        """The whole data-parallel degree, dp_replicate * dp_shard."""
        return self.dp_replicate * self.dp_shard

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dp_replicate, self.dp_shard, self.pp, self.cp, self.tp)

    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} is outside the world of {self.world_size} ranks")
        c = []
        for size in reversed(self.shape):
            c.append(rank % size)
            rank //= size
        t, cp, pp, dps, dpr = c
        return Coords(dp_replicate=dpr, dp_shard=dps, pp=pp, cp=cp, tp=t, dp=dpr * self.dp_shard + dps)

    def rank_of(self, dp_replicate: int = 0, dp_shard: int = 0, pp: int = 0, cp: int = 0, tp: int = 0) -> int:
        rank = 0
        for i, size in zip((dp_replicate, dp_shard, pp, cp, tp), self.shape):
            rank = rank * size + i
        return rank

    def groups(self, kind: str) -> list[list[int]]:
        """All groups of one kind, each a sorted list of global ranks; together they partition the world
        (except `embedding`, whose groups hold the first and last pipeline stage of each pipeline)."""
        if kind not in KINDS:
            raise LayoutError(f"unknown group kind {kind!r}; expected one of {', '.join(KINDS)}")
        if kind not in self._groups:
            self._groups[kind] = self._compute(kind)
        return self._groups[kind]

    def group_of(self, kind: str, rank: int) -> list[int]:
        """The members of `rank`'s group of this kind."""
        for members in self.groups(kind):
            if rank in members:
                return members
        raise LayoutError(f"rank {rank} is in no {kind} group")  # only out-of-range ranks get here

    def _compute(self, kind: str) -> list[list[int]]:
        if kind == "embedding":
            # The first and last stage hold the tied input embedding and output layer (Megatron's embedding group).
            return [sorted({pipe[0], pipe[-1]}) for pipe in self.groups("pp")]
        varying = GROUP_AXES[kind]
        by_key: dict[tuple[int, ...], list[int]] = {}
        for rank in range(self.world_size):
            c = self.coords(rank)
            key = tuple(getattr(c, a) for a in AXES if a not in varying)
            by_key.setdefault(key, []).append(rank)
        return [by_key[k] for k in sorted(by_key)]


def build_grid(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1, dp_shard: int = 1) -> Grid:
    """Computes the dp x pp x cp x tp grid for `world_size` ranks; pure (no process group)."""
    for name, value in (("world_size", world_size), ("tp", tp), ("pp", pp), ("cp", cp), ("dp_shard", dp_shard)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayoutError(f"parallel.{name} must be a positive integer, got {value!r}")
    model = tp * pp * cp * dp_shard
    if world_size % model != 0:
        raise LayoutError(
            f"world size {world_size} is not divisible by tp*pp*cp*dp_shard = {tp}*{pp}*{cp}*{dp_shard} = {model}; "
            "change parallel.tp/pp/cp/dp_shard or the number of processes"
        )
    return Grid(world_size, tp, pp, cp, dp_shard, world_size // model)


@dataclass
class _State:
    grid: Grid
    rank: int
    groups: dict[str, dist.ProcessGroup]
    ranks: dict[str, list[int]]
    owns_default_group: bool


_STATE: _State | None = None


def init_process_group(backend: str | None = None, timeout: timedelta | None = None) -> None:
    """Initialises the default group from torchrun's environment (or as a 1-process world when there is none).

    The store is prefixed by the elastic restart attempt: after a worker dies, torchrun restarts the workers with
    the same store, and gloo workers would otherwise read the previous attempt's addresses from it and fail in
    connectFullMesh ("Connection refused").
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {} if timeout is None else {"timeout": timeout}
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        store, rank, world = dist.HashStore(), 0, 1
    else:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise LayoutError(f"cannot initialise torch.distributed: environment variable(s) {missing} not set")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        # Under torchrun the agent hosts the TCPStore (TORCHELASTIC_USE_AGENT_STORE); otherwise rank 0 does.
        is_master = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        tcp = dist.TCPStore(addr, port, world, is_master, **kwargs, wait_for_workers=False)
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", tcp)
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, **kwargs)


def initialize(
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    dp_shard: int = 1,
    backend: str | None = None,
    timeout: timedelta | float | None = None,
) -> Grid:
    """Builds every process group of the dp x pp x cp x tp grid once and returns the grid.

    Initialises the default group itself (from torchrun's environment) when the caller has not. Calling it again
    with the same layout is a no-op; a different layout needs `destroy()` first. `timeout` is a timedelta or
    seconds; `backend` defaults to nccl with CUDA, else gloo (only used when the default group is made here).
    """
    global _STATE
    if isinstance(timeout, (int, float)):
        timeout = timedelta(seconds=timeout)
    owns = False
    if not dist.is_initialized():
        init_process_group(backend, timeout)
        owns = True
    try:
        grid = build_grid(dist.get_world_size(), tp, pp, cp, dp_shard)
    except LayoutError:
        if owns:  # a refused layout must not leave behind a default group the caller never asked for
            dist.destroy_process_group()
        raise
    if _STATE is not None:
        if _STATE.grid.shape == grid.shape:
            return _STATE.grid
        raise LayoutError(
            f"engine.parallel is already initialised with tp={_STATE.grid.tp} pp={_STATE.grid.pp} "
            f"cp={_STATE.grid.cp} dp_shard={_STATE.grid.dp_shard}; call engine.parallel.state.destroy() first"
        )
    rank = dist.get_rank()
    kwargs = {} if timeout is None else {"timeout": timeout}
    groups: dict[str, dist.ProcessGroup] = {}
    ranks: dict[str, list[int]] = {}
    built: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
    for kind in KINDS:
        for members in grid.groups(kind):
            key = tuple(members)
            if key not in built:  # identical member lists (e.g. tp and tp_cp when cp == 1) share one group
                built[key] = dist.new_group(members, **kwargs)
            if rank in members:
                groups[kind], ranks[kind] = built[key], members
    _STATE = _State(grid=grid, rank=rank, groups=groups, ranks=ranks, owns_default_group=owns)
    return grid


def is_initialized() -> bool:
    return _STATE is not None


def destroy() -> None:
    """Destroys the groups `initialize` made (and the default group if it made that too); for tests and reuse."""
    global _STATE
    if _STATE is None:
        return
    state, _STATE = _STATE, None
    if not dist.is_initialized():
        return
    for group in {id(g): g for g in state.groups.values()}.values():
        dist.destroy_process_group(group)
    if state.owns_default_group:
        dist.destroy_process_group()


def _state() -> _State:
    if _STATE is None:
        raise RuntimeError("engine.parallel is not initialised: call engine.parallel.initialize(tp=..., ...) first")
    return _STATE


def get_grid() -> Grid:
    return _state().grid


def get_group(kind: str) -> dist.ProcessGroup:
    """This rank's process group of one kind (see `KINDS`)."""
    state = _state()
    if kind not in KINDS:
        raise LayoutError(f"unknown group kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind not in state.groups:  # only the embedding group leaves ranks out: the middle pipeline stages
        raise LayoutError(f"rank {state.rank} is in no {kind} group (a middle pipeline stage)")
    return state.groups[kind]


def get_group_ranks(kind: str) -> list[int]:
    """The global ranks in this rank's group of one kind, sorted."""
    get_group(kind)
    return list(_state().ranks[kind])


def get_rank_in(kind: str) -> int:
    return get_group_ranks(kind).index(_state().rank)


def get_world_size_of(kind: str) -> int:
    return len(get_group_ranks(kind))


def get_coords() -> Coords:
    state = _state()
    return state.grid.coords(state.rank)


def is_pipeline_first_stage() -> bool:
    return get_coords().pp == 0


def is_pipeline_last_stage() -> bool:
    return get_coords().pp == get_grid().pp - 1


def _accessors(kind: str):
    return (lambda: get_group(kind), lambda: get_rank_in(kind), lambda: get_world_size_of(kind))


# Named accessors, Megatron style: get_tp_group(), get_tp_rank(), get_tp_world_size(), and so on for each kind.
get_tp_group, get_tp_rank, get_tp_world_size = _accessors("tp")
get_pp_group, get_pp_rank, get_pp_world_size = _accessors("pp")
get_cp_group, get_cp_rank, get_cp_world_size = _accessors("cp")
get_dp_group, get_dp_rank, get_dp_world_size = _accessors("dp")
get_dp_shard_group, get_dp_shard_rank, get_dp_shard_world_size = _accessors("dp_shard")
get_dp_replicate_group, get_dp_replicate_rank, get_dp_replicate_world_size = _accessors("dp_replicate")
get_dp_cp_group, get_dp_cp_rank, get_dp_cp_world_size = _accessors("dp_cp")
get_tp_cp_group, get_tp_cp_rank, get_tp_cp_world_size = _accessors("tp_cp")
get_model_parallel_group, get_model_parallel_rank, get_model_parallel_world_size = _accessors("model_parallel")
get_embedding_group, get_embedding_rank, get_embedding_world_size = _accessors("embedding")
