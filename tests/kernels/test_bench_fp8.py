"""Smoke test of benchmarks/bench_fp8.py on CPU: every granularity's row runs and its output matches the dequantised
product (the GPU run measures the speed)."""

import json


def test_bench_fp8_smoke(tmp_path, capsys):
    from benchmarks.bench_fp8 import GRANULARITIES, main

    out = tmp_path / "rows.json"
    assert main(["--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    impls = {r["impl"] for r in rows}
    assert "bf16 matmul" in impls
    for label in GRANULARITIES:
        assert {f"ours {label}", f"ours {label} +quant"} <= impls
    assert all(r["err"] < 1e-2 and r["ms"] > 0 for r in rows)
    assert "BAD" not in capsys.readouterr().out
