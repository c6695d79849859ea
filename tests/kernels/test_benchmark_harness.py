"""benchmarks/kernels.py in its CPU mode: correctness of every kernel family on tiny shapes, a missing kernel module
reported as unavailable, a wrong kernel reported as FAIL, and the output helpers used on GPU."""

import csv
import dataclasses
import importlib
import sys
import types

import pytest
import torch

from benchmarks import kernels as bench


def _csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU mode only")
def test_cpu_mode_checks_every_kernel(tmp_path, capsys):
    out = tmp_path / "k.csv"
    assert bench.main(["--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "correctness part only" in text
    rows = _csv_rows(out)
    assert {r["kernel"] for r in rows} == set(bench.SPECS)
    for r in rows:
        # a kernel module that is missing (or fails to import) must read "unavailable", never crash the run.
        if r["status"].startswith("unavailable"):
            continue
        assert r["status"] == "ok", r
        assert float(r["fwd_err"]) <= 1e-5 and float(r["bwd_err"]) <= 1e-5
    assert text.rstrip().splitlines()[-1].startswith(list(bench.SPECS)[-1])  # the table is printed last
    assert "flash_attention" in bench.SPECS


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU mode only")
def test_missing_and_wrong_kernels_are_reported(monkeypatch, capsys):
    specs = dict(bench.SPECS)
    specs["rmsnorm"] = dataclasses.replace(specs["rmsnorm"], module="kernels.not_written_yet")
    good_build = specs["cross_entropy"].build

    def wrong_build(mod, shape, dtype, device):
        case = good_build(mod, shape, dtype, device)
        ours = case.ours
        case.ours = lambda x: ours(x) * 1.001  # a 0.1% error must not pass the 1e-5 bound
        return case

    specs["cross_entropy"] = dataclasses.replace(specs["cross_entropy"], build=wrong_build)
    monkeypatch.setattr(bench, "SPECS", specs)
    assert bench.main(["--only", "rmsnorm,cross_entropy"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("rmsnorm") and "unavailable (ModuleNotFoundError" in line for line in lines)
    assert any(line.startswith("cross_entropy") and line.rstrip().endswith("FAIL") for line in lines)


def test_unknown_kernel_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--only", "rmsnorm,softmax"])
    assert exc.value.code == 2
    assert "unknown kernel(s) ['softmax']" in capsys.readouterr().err


def test_gpu_report_helpers():
    rows = [
        {"kernel": "fused_linear_ce", "shape": "8x4x32000", "impl": "ours", "fwdbwd_ms": 2.0, "peak_mem_mb": 10.0},
        {"kernel": "fused_linear_ce", "shape": "8x4x131072", "impl": "ours", "fwdbwd_ms": 2.0, "peak_mem_mb": 100.0},
        {"kernel": "fused_linear_ce", "shape": "8x4x131072", "impl": "torch", "fwdbwd_ms": 3.0, "peak_mem_mb": 900.0},
        {"kernel": "fused_linear_ce", "shape": "8x4x131072", "impl": "liger", "fwdbwd_ms": 2.5, "peak_mem_mb": 150.0},
    ]
    bench._add_ratios(rows[1:])
    assert rows[1]["speedup_vs_best"] == pytest.approx(1.25) and rows[1]["mem_ratio_vs_best"] == pytest.approx(1.5)
    summary = bench.flce_memory_summary(rows)
    assert "8x4x131072" in summary and "fused 100 MB vs unfused torch 900 MB (9.0x less)" in summary
    assert "Liger 150 MB" in summary
    table = bench.format_table(rows, ["kernel", "impl", "peak_mem_mb", "speedup_vs_best"])
    assert table.splitlines()[2].split()[:3] == ["fused_linear_ce", "ours", "10"]
    assert bench._throughput(2e9, 1.0, "GB/s") == pytest.approx(2000.0)  # 2 GB in 1 ms
    assert bench._throughput(1e12, 1.0, "TFLOP/s") == pytest.approx(1000.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real GPU run covers this")
def test_timed_run_orchestration_on_cpu(monkeypatch):
    """run_gpu's bookkeeping (2x-rule check in fp16, throughput, % of ceiling, ratios, memory line) with the three
    device-only measurements replaced: the real ones need CUDA events and a CUDA allocator."""
    times, alive = {}, []

    def fake_bench(fn, inputs, backward, warmup, rep):
        alive.append(fn)  # keyed by id: keep each fn alive so that a later one cannot reuse its id
        t = times.setdefault(id(fn), 1.0 + len(times))  # ours is timed first: 1 ms, torch eager 2 ms
        return [t * (2 if backward else 1), 0.9 * t, 1.1 * t]

    monkeypatch.setattr(bench, "measure_ceilings", lambda warmup, rep: {"GB/s": 1000.0, "TFLOP/s": 100.0})
    monkeypatch.setattr(bench, "_bench", fake_bench)
    # Per case ours is timed first, then torch: odd and even indices.
    monkeypatch.setattr(bench, "_peak_memory_mb", lambda fn, inputs: 8.0 if times[id(fn)] % 2 else 24.0)
    rows = bench.run_gpu(["swiglu", "fused_linear_ce"], torch.float16, 1, 1, False, device="cpu", small=True)
    assert [(r["kernel"], r["impl"]) for r in rows] == [
        ("swiglu", "ours"),
        ("swiglu", "torch"),
        ("fused_linear_ce", "ours"),
        ("fused_linear_ce", "torch"),
    ]
    ours = rows[0]
    assert ours["status"] == "ok" and ours["fwd_err"] < 1e-2  # fp16 passes the 2x rule against fp32
    n = 5 * 37 * 2  # swiglu 5x37 fp16: bytes of one tensor
    assert ours["fwdbwd_tput"] == pytest.approx(8 * n / 2.0 / 1e6)
    assert ours["pct_ceiling"] == pytest.approx(100 * ours["fwdbwd_tput"] / 1000.0)
    assert ours["speedup_vs_best"] == pytest.approx(2.0)
    flce = rows[2]
    assert flce["metric"] == "TFLOP/s" and flce["fwdbwd_tput"] == pytest.approx(
        6 * 5 * 16 * 37 / flce["fwdbwd_ms"] / 1e9
    )
    assert rows[3]["device"] == "cpu" and rows[3]["ceiling_tflops"] == 100.0
    assert "fused 8 MB vs unfused torch 24 MB (3.0x less)" in bench.flce_memory_summary(rows)


def _liger_rotary_pos_emb_standin(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """Liger's ``liger_rotary_pos_emb`` contract in plain torch (Hugging Face's formula, which its kernel computes):
    q (b, heads_q, s, d), k (b, heads_kv, s, d), cos and sin (1, s, d) with both halves equal; its kernel works on
    the (b, s, heads, d) storage, so ``.transpose(1, 2)`` must be contiguous for its ``.contiguous()`` not to copy."""
    b, _, s, d = q.shape
    assert k.shape[0] == b and k.shape[2:] == (s, d)
    assert q.transpose(1, 2).is_contiguous() and k.transpose(1, 2).is_contiguous()
    assert cos.shape == sin.shape == (1, s, d) and cos.is_contiguous() and sin.is_contiguous()
    assert position_ids is None and unsqueeze_dim == 1

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    c, sn = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * c + rotate_half(q) * sn, k * c + rotate_half(k) * sn


def test_liger_rope_baseline_layout(monkeypatch):
    """The Liger RoPE baseline is used when liger_kernel imports (a stand-in with its signature and documented
    formula here), gets q and k as (b, h, s, d) views of our (b, s, h, d) storage and the tables duplicated to
    (1, s, d), and equals our reference on q and k, forward and backward."""
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    rope_mod = types.ModuleType("liger_kernel.transformers.rope")
    rope_mod.liger_rotary_pos_emb = _liger_rotary_pos_emb_standin
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.rope", rope_mod)

    spec = bench.SPECS["rope"]
    case = spec.build(importlib.import_module(spec.module), (2, 3, 4, 2, 8), torch.float32, "cpu")
    assert set(case.others) == {"liger"} and case.outputs == 2
    g = torch.Generator().manual_seed(0)
    gy = [torch.randn(t.shape, generator=g) for t in case.inputs]
    out, grads = bench._fwd_bwd(bench._take(case.others["liger"], 2), case.inputs, gy)
    hp = [t.detach().double().requires_grad_() for t in case.inputs]
    ref, ref_grads = bench._fwd_bwd(bench._take(case.reference, 2), hp, [t.double() for t in gy])
    assert [o.shape for o in out] == [t.shape for t in case.inputs]
    for a, b in zip(out + grads, ref + ref_grads):
        assert bench._rel_err(a, b) <= 1e-6
    assert all(g.abs().sum() > 0 for g in grads)  # both q and k are differentiated


def test_rope_case_without_liger(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # "import liger_kernel" raises ImportError
    spec = bench.SPECS["rope"]
    case = spec.build(importlib.import_module(spec.module), (1, 2, 2, 1, 4), torch.float32, "cpu")
    assert case.others == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke mode only")
def test_sweep_smoke_checks_each_candidate_against_the_current_config(tmp_path, monkeypatch):
    """benchmarks/sweep_kernels.py --smoke: every sweep runs, each attention candidate's outputs are compared with the
    current config's (a miscompiled config shows as a large max_err), and the launch configs are restored after."""
    import json

    import kernels.attention
    import kernels.norms
    from benchmarks import sweep_kernels

    before = (kernels.attention.launch_config, kernels.norms.launch_config, kernels.norms.num_reduction_programs)
    out = tmp_path / "sweep.json"
    assert sweep_kernels.main(["--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["sweep"] for r in rows} == {"attention", "norms", "flce", "flce_accumulate"}
    attn = [r for r in rows if r["sweep"] == "attention"]
    assert {r["kernel"] for r in attn} == {"fwd", "dkdv", "dq"}
    assert all(r["max_err"] < 1e-5 and r["ms"] > 0 for r in attn)
    assert all("error" not in r for r in rows if r["sweep"] in ("norms", "flce"))
    assert before == (
        kernels.attention.launch_config,
        kernels.norms.launch_config,
        kernels.norms.num_reduction_programs,
    )
    with pytest.raises(SystemExit):
        sweep_kernels.main(["--only", "nope", "--smoke"])
