"""Smoke test of benchmarks/bench_objectives.py: every transform at both configs' sequence lengths gives a positive
rate (the full UL2 mixture where the sentinels allow it, else without its X denoisers, saying why), and the JSON
holds the consumption figures and the margins they give."""

import json

import pytest

from engine.data.tokenizer import ByteTokenizer
from engine.objectives.sample_objective import SampleObjective

COMMON = {"clm", "fim0.5", "fim1.0", "mlm", "mtp", "prefix", "span"}
# At seq 1024 UL2's X denoisers make more spans than the 100 sentinel ids: the row is its R and S denoisers.
TRANSFORMS = {"tiny": COMMON | {"ul2"}, "gpt2_125m": COMMON | {"ul2 R+S"}}


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
        (c, t) for c, names in TRANSFORMS.items() for t in names
    )
    for r in rows:
        need = report["consumption"][r["config"]]["samples_per_s"]
        assert r["tokenizer"] == "byte" and r["samples_per_s"] > 0 and r["read_samples_per_s"] > 0
        assert r["consumption_samples_per_s"] == need
        assert r["margin"] == pytest.approx(r["samples_per_s"] / need)
        assert r["collate_samples_per_s"] > 0
        assert r["collate_margin"] == pytest.approx(r["collate_samples_per_s"] / need)
        name = r["transform"].split()[0]  # span, ul2: windows of the denoisers' length; the others seq_len + 1
        kw = {"ul2_x_rate": 0.0} if r["transform"] == "ul2 R+S" else {}
        denoising = name in ("span", "ul2")
        window = SampleObjective(name, 0, ByteTokenizer(), seq_len=r["seq_len"], **kw).window_length if denoising else 0
        assert r["raw_len"] == (window if denoising else r["seq_len"] + 1) and (window > r["seq_len"] + 1) == denoising
        assert ("refused" in r["note"] and "sentinel" in r["note"]) == (r["transform"] == "ul2 R+S"), r
