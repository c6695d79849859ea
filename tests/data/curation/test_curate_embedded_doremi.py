"""examples/curate_embedded.py --doremi: a smoke run (8 documents per domain, 2 proxy rounds of 2 steps) trains on
the DoReMi weights, started from the temperature weights, and records the rounds."""

import json
import re

import pytest

from engine.data.curation.mixing import temperature_weights
from engine.data.indexed_dataset import IndexedDataset
from tests.data.curation.test_curate_embedded import _example


def test_doremi_option_trains_on_the_doremi_blend(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    run, example = tmp_path / "run", _example()
    argv = ["--run-dir", str(run), "--max-docs", "8", "--steps", "2", "--threads", "1", "--temperature", "3",
            "--doremi", "2", "--doremi-steps", "2"]  # fmt: skip
    assert example.main(argv) == 0
    out = capsys.readouterr().out
    record = json.loads((run / "doremi.json").read_text())
    tokens = {d: IndexedDataset(str(run / "data" / d)).num_tokens for d in ("code", "prose")}
    assert record["baseline"] == pytest.approx(temperature_weights(tokens, 3.0))  # DoReMi starts from T = 3
    assert len(record["rounds"]) == 2 and record["rounds"][0]["trained_on"] == record["baseline"]
    assert set(record["reference_losses"]) == {"code", "prose"}
    w = record["weights"]
    blend = f"{w['code']:.6g} {run / 'data' / 'code'} {w['prose']:.6g} {run / 'data' / 'prose'}"
    assert re.search(r"--data.path (.*)", out).group(1) == record["blend"] == blend
    assert f"weight {w['code']:.3f} by DoReMi" in out and "DoReMi: 2 proxy rounds from the T=3 weights" in out
    assert re.search(r"trained 2 steps: loss \d+\.\d+, validation loss \d+\.\d+", out)


def test_bad_doremi_rounds_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    argv = ["--run-dir", str(tmp_path / "run"), "--doremi", "-1"]
    assert _example().main(argv) == 2
    err = capsys.readouterr().err
    assert err == "error: --doremi must be >= 0 and --doremi-steps >= 1, got -1 and 10\n"
    assert not (tmp_path / "run").exists()
