"""Smoke test of benchmarks/bench_dp.py at a tiny size: every row, its collectives and its optimizer-state bytes."""

import json

import pytest

from engine.scaling.layout import dp_wire_bytes

TINY = ["--dp", "2", "--steps", "2", "--warmup", "1", "--layers", "2", "--d-model", "32", "--heads", "4",
        "--vocab", "64", "--seq", "8", "--micro-batch", "2", "--bucket-mb", "0.004"]  # fmt: skip


@pytest.mark.distributed
def test_bench_dp_rows_bytes_and_state(tmp_path, capsys):
    """Each implementation has a row with a positive step time and a matching loss; ZeRO-1 reduce-scatters and
    all-gathers 4 bytes per parameter (plus bucket padding) and DDP-based rows all-reduce them; AdamW's state is
    8 bytes per parameter, on one rank (ddp: every rank) and within our padding of 8 P / dp per rank for ours."""
    from benchmarks.bench_dp import IMPLS, main

    out = tmp_path / "rows.json"
    assert main([*TINY, "--json", str(out)]) == 0  # the loss guard matched
    text = capsys.readouterr().out
    assert "MATCH" in text and "MISMATCH" not in text
    rows = {r["impl"]: r for r in json.loads(out.read_text())}
    assert set(rows) == set(IMPLS)
    p = rows["ddp"]["params"]
    for name, r in rows.items():
        assert r["dp"] == 2 and r["params"] == p and r["bytes_equal_on_ranks"], name
        assert r["step_s"] > 0 and all(t > 0 for t in r["step_s_per_rank"]), name
        assert r["max_loss_diff_vs_ddp"] <= 1e-5, name
        assert not r["other_ops"], name
    ours = rows["zero1"]
    buckets = ours["calls"]["reduce_scatter"]
    assert buckets >= 2 and ours["calls"]["all_gather"] == buckets
    for op in ("reduce_scatter", "all_gather"):  # each bucket padded by less than dp elements
        assert 4 * p <= ours["payload_bytes"][op] < 4 * (p + 2 * buckets), op
    assert ours["wire_bytes"]["reduce_scatter"] == ours["payload_bytes"]["reduce_scatter"] / 2
    assert ours["payload_bytes"]["all_reduce"] < 64  # only scalars: token count, gradient norm, loss
    for name in ("ddp", "torch-zero", "torch-zero-bucket"):
        r = rows[name]
        assert 4 * p <= r["payload_bytes"]["all_reduce"] < 4 * p + 64, name  # the gradients + two fp64 scalars
        assert r["calls"]["reduce_scatter"] == r["calls"]["all_gather"] == 0, name
    for name in ("torch-zero", "torch-zero-bucket"):
        assert rows[name]["payload_bytes"]["broadcast"] == 4 * p, name  # every parameter from its owner
    assert rows["ddp"]["calls"]["broadcast"] == ours["calls"]["broadcast"] == 0
    assert rows["ddp"]["state_bytes_per_rank"] == [8 * p, 8 * p]
    assert sum(ours["state_bytes_per_rank"]) == 8 * p
    assert max(ours["state_bytes_per_rank"]) <= 8 * (p + 2 * buckets) / 2
    assert ours["state_closed_form_bytes"] == 8 * p / 2
    for name in ("torch-zero", "torch-zero-bucket"):
        states = rows[name]["state_bytes_per_rank"]
        assert sum(states) == 8 * p and max(states) < 8 * p, name  # whole parameters, each on one rank
    # the layout planner's closed forms (engine.scaling.layout.dp_wire_bytes), fp32 parameters, 2 micro-batches:
    # DDP's all-reduce (+ the scalars), ZeRO-1's reduce-scatter + all-gather (+ bucket padding), and FSDP2's two
    # all-gathers per micro-batch of every layer, one of the root (embedding and norm: 64 x 32 + 32), and its
    # reduce-scatter, exactly
    wire = {name: sum(r["wire_bytes"][op] for op in ("all_reduce", "reduce_scatter", "all_gather")) for name, r in
            rows.items()}  # fmt: skip
    assert dp_wire_bytes(p, 2, "ddp", 2, 4, 4) <= wire["ddp"] < dp_wire_bytes(p, 2, "ddp", 2, 4, 4) + 64
    assert dp_wire_bytes(p, 2, "zero1", 2, 4, 4) <= wire["zero1"] < dp_wire_bytes(p, 2, "zero1", 2, 4, 4) + 64
    assert wire["fsdp2"] - rows["fsdp2"]["wire_bytes"]["all_reduce"] == dp_wire_bytes(p, 2, "fsdp", 2, 4, 4,
                                                                                       root_params=64 * 32 + 32)
    fsdp = rows["fsdp2"]  # parameters gathered for forward and backward, gradients reduce-scattered, 1/dp of state
    assert fsdp["payload_bytes"]["reduce_scatter"] >= 4 * p and fsdp["payload_bytes"]["all_gather"] >= 2 * 4 * p
    assert sum(fsdp["state_bytes_per_rank"]) == 8 * p and max(fsdp["state_bytes_per_rank"]) < 8 * p
    assert "not run: torch-zero overlap_with_ddp" in text
