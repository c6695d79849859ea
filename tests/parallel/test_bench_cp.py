"""Smoke test of benchmarks/bench_cp.py at a tiny size: a row per (cp, implementation), sequences tried in increasing
order until the cap, the reported one the last that fitted."""

import json

import pytest


@pytest.mark.distributed
def test_bench_cp_rows(tmp_path):
    from benchmarks.bench_cp import main

    out = tmp_path / "rows.json"
    assert main(["--cp", "1,2", "--cap-mb", "8", "--time-seq", "512", "--layers", "1", "--d-model", "32",
                 "--heads", "2", "--json", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())
    assert [(r["cp"], r["impl"]) for r in rows] == [(1, "ring"), (2, "ring"), (2, "alltoall")]
    assert all(r["longest_seq"] >= 1024 for r in rows)  # the cap fits a sequence or more in every row
    for r in rows:
        seqs = [s for s, _ in r["tried"]]
        assert seqs == sorted(seqs) and r["step_s"] > 0
        fitted = [s for s, mb in r["tried"] if mb <= 8]
        assert r["longest_seq"] == (fitted[-1] if fitted else 0)
        assert all(mb <= 8 for s, mb in r["tried"] if s <= r["longest_seq"])
