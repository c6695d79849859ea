"""examples/scaling_sweep.py at a tiny budget: one row per (budget, shape) with C = 6ND near the budget, the fit
written, and a rerun that trains nothing again."""

import csv
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _sweep():
    spec = importlib.util.spec_from_file_location("scaling_sweep", ROOT / "examples" / "scaling_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_sweep_rows_fit_and_resume(tmp_path, tmp_path_factory, monkeypatch):
    # the session's shared cache (as tests/convert and tests/evaluation use): the embedded corpus is built once
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path_factory.getbasetemp() / "engine_cache"))
    out = tmp_path / "sweep"
    args = ["--budgets", "3e9", "--shapes", "16x1,24x1,32x1,48x1,64x1", "--out", str(out), "--bootstrap", "0"]
    assert _sweep()(args) == 0
    with (out / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["d_model"]), int(r["n_layers"])) for r in rows] == [(16, 1), (24, 1), (32, 1), (48, 1), (64, 1)]
    for r in rows:
        n, d, c = int(r["N"]), int(r["D"]), float(r["C"])
        assert c == 6 * n * d and abs(c - 3e9) < 0.2 * 3e9  # whole steps of 2048 tokens round the budget
        assert float(r["flops"]) > c and 0 < float(r["loss"]) < 6  # attention on top of 6N; trained below ln 320
    fit = json.loads((out / "fit.json").read_text())
    assert {"E", "A", "B", "alpha", "beta"} <= set(fit["approach3"])
    assert "2 FLOP bands" in fit["approach2"]["error"]  # one budget: Approach 2 reports why it cannot fit
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("C*/metrics.jsonl")}
    assert _sweep()(args) == 0  # every row is there: nothing retrains
    assert {p: p.stat().st_mtime_ns for p in out.glob("C*/metrics.jsonl")} == stamps
    with (out / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 5
