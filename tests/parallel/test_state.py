"""The dp x pp x cp x tp grid: pure layout math, bad layouts, and the real groups over gloo."""

import itertools
import os

import pytest

from engine.parallel.state import KINDS, LayoutError, build_grid
from tests.distributed import free_port, run_distributed


def test_coords_roundtrip_and_tp_fastest():
    grid = build_grid(48, tp=2, pp=2, cp=3, dp_shard=2)
    assert (grid.dp_replicate, grid.dp) == (2, 4)
    for rank in range(48):
        c = grid.coords(rank)
        assert grid.rank_of(c.dp_replicate, c.dp_shard, c.pp, c.cp, c.tp) == rank
        assert c.dp == c.dp_replicate * 2 + c.dp_shard
    assert [grid.coords(r).tp for r in range(4)] == [0, 1, 0, 1]
    assert grid.coords(2).cp == 1 and grid.coords(6).pp == 1 and grid.coords(12).dp_shard == 1


def test_known_layout_groups():
    grid = build_grid(8, tp=2, pp=2)
    assert grid.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert grid.groups("pp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert grid.groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert grid.groups("cp") == [[r] for r in range(8)]
    assert grid.groups("model_parallel") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert grid.groups("embedding") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    grid = build_grid(16, tp=2, cp=2, dp_shard=2)
    assert grid.group_of("dp_shard", 0) == [0, 4] and grid.group_of("dp_replicate", 0) == [0, 8]
    assert grid.group_of("dp", 0) == [0, 4, 8, 12]
    assert grid.group_of("dp_cp", 1) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert grid.group_of("tp_cp", 5) == [4, 5, 6, 7]
    assert build_grid(8, pp=4).group_of("embedding", 7) == [4, 7]
    assert build_grid(8, pp=4).groups("embedding") == [[0, 3], [4, 7]]  # middle stages hold no embedding
    assert build_grid(4, tp=4).groups("embedding") == [[0], [1], [2], [3]]


@pytest.mark.parametrize("world,layout", [(16, dict(tp=2, pp=2, cp=2)), (24, dict(tp=4, pp=3, dp_shard=2)), (1, {})])
def test_groups_partition_the_world_with_the_right_sizes(world, layout):
    grid = build_grid(world, **layout)
    sizes = {"tp": grid.tp, "pp": grid.pp, "cp": grid.cp, "dp": grid.dp, "dp_shard": grid.dp_shard,
             "dp_replicate": grid.dp_replicate, "dp_cp": grid.dp * grid.cp, "tp_cp": grid.tp * grid.cp,
             "model_parallel": grid.tp * grid.pp}  # fmt: skip
    for kind, size in sizes.items():
        groups = grid.groups(kind)
        assert sorted(itertools.chain(*groups)) == list(range(world)), kind
        assert all(len(g) == size for g in groups), kind
    # Members of a group agree on every coordinate outside the group's axes.
    for members in grid.groups("tp"):
        assert len({(grid.coords(r).dp, grid.coords(r).pp, grid.coords(r).cp) for r in members}) == 1


@pytest.mark.parametrize(
    "world,layout,match",
    [
        (6, dict(tp=4), "not divisible by tp\\*pp\\*cp\\*dp_shard"),
        (8, dict(tp=2, pp=2, cp=3), "not divisible"),
        (8, dict(tp=2, dp_shard=3), "not divisible"),
        (8, dict(tp=0), "parallel.tp must be a positive integer"),
        (8, dict(pp=1.5), "parallel.pp must be a positive integer"),
        (8, dict(cp=True), "parallel.cp must be a positive integer"),
        (0, {}, "world_size must be a positive integer"),
    ],
)
def test_bad_layouts_are_one_line_value_errors(world, layout, match):
    with pytest.raises(ValueError, match=match) as info:
        build_grid(world, **layout)
    assert isinstance(info.value, LayoutError) and "\n" not in str(info.value)


def test_bad_queries():
    grid = build_grid(4, tp=2)
    with pytest.raises(LayoutError, match="unknown group kind"):
        grid.groups("ep")
    with pytest.raises(LayoutError, match="outside the world"):
        grid.coords(4)


def _groups_worker(rank, world, port):
    """Re-initialises from the environment (as inside someone else's torchrun script, restart attempt 2) and checks
    every group by summing ranks over it."""
    import torch
    import torch.distributed as dist

    from engine.parallel import state

    dist.destroy_process_group()
    os.environ.update(MASTER_PORT=str(port), TORCHELASTIC_RESTART_COUNT="2")
    grid = state.initialize(tp=2, pp=2, timeout=60)
    assert dist.is_initialized() and state.is_initialized() and dist.get_world_size() == 4
    expected = build_grid(4, tp=2, pp=2)
    assert grid == expected
    for kind in KINDS:
        members = expected.group_of(kind, rank)
        assert state.get_group_ranks(kind) == members
        assert state.get_world_size_of(kind) == len(members) and state.get_rank_in(kind) == members.index(rank)
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=state.get_group(kind))
        assert t.item() == sum(members), (kind, t.item(), members)
    assert (state.get_tp_rank(), state.get_tp_world_size()) == (rank % 2, 2)
    assert (state.get_pp_rank(), state.get_pp_world_size()) == (rank // 2, 2)
    assert state.get_dp_world_size() == 1 and state.get_cp_world_size() == 1
    assert state.is_pipeline_first_stage() == (rank < 2) and state.is_pipeline_last_stage() == (rank >= 2)
    assert state.get_embedding_world_size() == 2
    assert state.initialize(tp=2, pp=2) is grid  # same layout: a no-op
    errors = []
    for layout in (dict(tp=4), dict(tp=3)):
        try:
            state.initialize(**layout)
        except LayoutError as e:
            errors.append(str(e))
    state.destroy()  # also destroys the default group, which initialize made
    assert not state.is_initialized() and not dist.is_initialized()
    try:
        state.get_tp_group()
    except RuntimeError as e:
        errors.append(str(e))
    return errors


@pytest.mark.distributed
def test_initialize_from_env_builds_every_group():
    errors = run_distributed(_groups_worker, 4, free_port(), timeout=120)
    for errs in errors:
        assert "already initialised with tp=2 pp=2" in errs[0]
        assert "world size 4 is not divisible by tp*pp*cp*dp_shard = 3*1*1*1" in errs[1]
        assert "call engine.parallel.initialize" in errs[2]


def test_single_process_initialize_without_torchrun(monkeypatch):
    """No torchrun environment: a 1-process world (layers then run at tp=1 with no communication)."""
    import torch
    import torch.distributed as dist

    from engine.parallel import state
    from engine.parallel.tensor import ColumnParallelLinear

    for key in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this pytest process")
    try:
        grid = state.initialize(backend="gloo")
        assert grid.world_size == 1 and state.get_tp_world_size() == 1 and state.get_dp_rank() == 0
        torch.manual_seed(0)
        ref = torch.nn.Linear(4, 6)
        torch.manual_seed(0)
        col = ColumnParallelLinear(4, 6)
        x = torch.randn(3, 4)
        assert torch.equal(col(x), ref(x))
    finally:
        state.destroy()
    assert not dist.is_initialized()
