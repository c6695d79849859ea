"""examples/curate_embedded.py: a smoke run (a few documents per domain, 2 steps) curates each domain, tokenises
what survived, mixes by temperature and trains on the blend; bad input is one line."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from engine.data.curation.mixing import temperature_weights
from engine.data.indexed_dataset import IndexedDataset
from engine.metrics import read_metrics

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "curate_embedded.py"


def _example():
    spec = importlib.util.spec_from_file_location("_example_curate_embedded", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_curates_mixes_and_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    run, example = tmp_path / "run", _example()
    argv = ["--run-dir", str(run), "--max-docs", "8", "--steps", "2", "--threads", "1", "--temperature", "3"]
    assert example.main(argv) == 0
    out = capsys.readouterr().out
    tokens = {}
    for domain in ("code", "prose"):
        report = json.loads((run / "curated" / domain / "report.json").read_text())
        assert report["documents_in"] == 8
        kept = IndexedDataset(str(run / "data" / domain))
        assert len(kept) == report["documents_out"] > 0  # the curated documents, not the raw ones, were tokenised
        tokens[domain] = kept.num_tokens
        assert f"{domain}: {report['documents_out']}/8 documents kept" in out
        assert len(IndexedDataset(str(run / "data" / f"valid_{domain}"))) > 0
    weights = temperature_weights(tokens, 3.0)
    blend = re.search(r"--data.path (.*)", out).group(1)
    assert blend == f"{weights['code']:.6g} {run / 'data' / 'code'} {weights['prose']:.6g} {run / 'data' / 'prose'}"
    assert re.search(r"trained 2 steps: loss \d+\.\d+, validation loss \d+\.\d+", out)
    # The per-domain evaluation is the trainer's: on the whole validation set it gives the trainer's final val_loss.
    final = [r for r in read_metrics(run / "train" / "metrics.jsonl") if "val_loss" in r][-1]
    whole = example.domain_val_losses(run / "train", {"all": str(run / "data" / "valid")})["all"]
    assert final["step"] == 2 and whole == pytest.approx(final["val_loss"], rel=1e-5)
    per_domain = [float(x) for x in re.findall(r"validation loss (\d+\.\d+)\n", out)]
    assert len(per_domain) == 2 and all(3 < x < 7 for x in per_domain), out
    assert example.main(argv) == 2  # the run directory is taken now


@pytest.mark.parametrize("flag, value, expected", [
    ("--steps", "0", "--steps must be >= 1, got 0"),
    ("--max-docs", "0", "--max-docs must be >= 1, got 0"),
    ("--temperature", "-1", "temperature must be > 0"),
])  # fmt: skip
def test_bad_input_is_one_line(flag, value, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    argv = ["--run-dir", str(tmp_path / "run"), "--max-docs", "2", "--threads", "1", flag, value]
    assert _example().main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "run").exists()
