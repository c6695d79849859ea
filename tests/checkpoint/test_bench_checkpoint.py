"""Smoke test of benchmarks/bench_checkpoint.py at a tiny size (0.01 GB, one repeat, no restart): every measured
field is in the JSON with a positive value, and the state is the size asked for; `--device cuda` without CUDA is
refused in one line."""

import json

import pytest
import torch

SAVES = ("torch_save", "engine_sync", "engine_async_stall", "engine_async_total")
LOADS = ("torch_load_cold", "torch_load_warm", "engine_load_cold", "engine_load_warm")
RATIOS = ("save_engine_sync_vs_torch", "save_engine_async_total_vs_torch", "load_engine_vs_torch_cold",
          "load_engine_vs_torch_warm")  # fmt: skip
STALL = ("step_s", "stall_s", "stall_pct", "write_s", "overlapped_steps", "overlapped_step_s", "slowdown",
         "after_step_s")  # fmt: skip


def test_bench_checkpoint_smoke(tmp_path, capsys):
    from benchmarks.bench_checkpoint import main

    out = tmp_path / "ckpt.json"
    assert main(["--smoke", "--json", str(out), "--dir", str(tmp_path)]) == 0
    res = json.loads(out.read_text())
    cfg = res["config"]
    assert cfg["device"] == "cpu" and cfg["batch"] == 16
    assert abs(cfg["state_bytes"] / 1e9 - 0.01) < 0.002 and cfg["params"] * 12 == cfg["state_bytes"]
    for group, keys in (("save", SAVES), ("load", LOADS)):
        assert sorted(res[group]) == sorted(keys)
        for k in keys:
            r = res[group][k]
            assert r["s"] > 0 and r["gbps"] > 0 and 0 < r["best_s"] <= r["s"], (group, k, r)
            assert abs(r["gbps"] - cfg["state_bytes"] / 1e9 / r["s"]) < 1e-9 * r["gbps"] + 1e-12
    assert sorted(res["ratios"]) == sorted(RATIOS + tuple(f"{k}_best" for k in RATIOS))
    assert all(v > 0 for v in res["ratios"].values()), res["ratios"]
    for k in STALL:
        assert res["stall"][k] > 0, k
    assert res["stall"]["overlapped_steps"] == len(res["stall"]["overlapped_all_s"])
    assert res["restart"] is None
    assert list(tmp_path.iterdir()) == [out]  # the temporary directory was removed
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:5] == ["what", "s", "GB/s", "vs", "torch"] and table[-1].startswith("train step")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_bench_checkpoint_cuda_refused_without_cuda(tmp_path, capsys):
    from benchmarks.bench_checkpoint import main

    assert main(["--device", "cuda", "--smoke", "--dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "no CUDA device" in err, err
    assert list(tmp_path.iterdir()) == []  # refused before building or writing anything
