"""Smoke test of benchmarks/bench_objectives.py: every transform at both configs' sequence lengths gives a positive
rate, and the JSON holds the consumption figures and the margins they give."""

import json

import pytest

from engine.objectives.span_corruption import t5_lengths

TRANSFORMS = {"clm", "fim0.5", "fim1.0", "mlm", "span"}


def test_bench_objectives_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    from benchmarks.bench_objectives import main

    out = tmp_path / "bench.json"
    assert main(["--smoke", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["samples"] > 0
    tiny, big = report["consumption"]["tiny"], report["consumption"]["gpt2_125m"]
    assert (tiny["seq_len"], big["seq_len"]) == (128, 1024)
    assert "RESULTS.md" in tiny["source"] and tiny["samples_per_s"] == pytest.approx(tiny["tokens_per_s"] / 128)
    assert 6e8 < big["flops_per_token"] < 1.2e9  # GPT-2 small: ~6 x 124M plus attention
    assert big["tokens_per_s"] == pytest.approx(0.4 * 989e12 / big["flops_per_token"])
    assert big["samples_per_s"] == pytest.approx(big["tokens_per_s"] / 1024)

    rows = report["rows"]
    assert sorted((r["config"], r["transform"]) for r in rows) == sorted(
        (c, t) for c in ("tiny", "gpt2_125m") for t in TRANSFORMS
    )
    for r in rows:
        need = report["consumption"][r["config"]]["samples_per_s"]
        assert r["tokenizer"] == "byte" and r["samples_per_s"] > 0 and r["read_samples_per_s"] > 0
        assert r["consumption_samples_per_s"] == need
        assert r["margin"] == pytest.approx(r["samples_per_s"] / need)
        if r["transform"] == "span":
            assert r["raw_len"] == t5_lengths(r["seq_len"])[0] and r["collate_samples_per_s"] is None
        else:
            assert r["collate_samples_per_s"] > 0
            assert r["collate_margin"] == pytest.approx(r["collate_samples_per_s"] / need)
