"""Smoke test of benchmarks/bench_hf_kernels.py on CPU: both variants run the same code path as on a GPU (tiny
config; under the Triton interpreter "ours" runs the Triton kernels) and their losses agree."""

import json

import pytest

pytest.importorskip("transformers")


def test_bench_hf_kernels_cpu_smoke(tmp_path, capsys):
    from benchmarks.bench_hf_kernels import main

    out = tmp_path / "rows.json"
    assert main(["--device", "cpu", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"transformers", "ours"}
    assert abs(rows["ours"]["loss"] - rows["transformers"]["loss"]) < 1e-4 * rows["transformers"]["loss"]
    assert all(r["step_ms"] > 0 and r["peak_gib"] is None for r in rows.values())
    assert "BAD" not in capsys.readouterr().out
