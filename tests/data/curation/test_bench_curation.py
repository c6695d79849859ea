"""Smoke test of benchmarks/bench_curation.py on a tiny input (the datatrove side only when it is installed), and
the pair-agreement arithmetic it reports."""

import json

import numpy as np

from benchmarks.bench_curation import cluster_pairs, datatrove_available, main, make_corpus, pair_agreement


def test_pair_agreement_and_cluster_pairs():
    assert cluster_pairs(np.array([0, 1, 0, 0, 4, 1])) == {(0, 2), (0, 3), (2, 3), (1, 5)}
    got = pair_agreement({(0, 2), (0, 3), (2, 3)}, {(0, 2), (1, 5)})
    assert got["precision"] == 1 / 3 and got["recall"] == 1 / 2 and got["jaccard"] == 1 / 4
    assert abs(got["f1"] - 0.4) < 1e-12


def test_planted_pairs_point_at_copies():
    texts, planted = make_corpus(40, dup_fraction=0.25, edit_rate=0.005, seed=3)
    assert len(texts) == 40 and len(planted) == 10
    for src, dup in planted:
        assert src < dup
        a, b = texts[src].split(" "), texts[dup].split(" ")
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) <= max(1, round(len(a) * 0.005))


def test_benchmark_runs_on_a_tiny_input(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = main(["--docs", "40", "--json", str(out)])
    assert "minhash_dedup" in capsys.readouterr().out
    assert json.loads(out.read_text()) == rows
    assert [r["stage"] for r in rows] == [
        "minhash_dedup",
        "gopher_repetition",
        "gopher_quality",
        "c4",
        "fineweb",
        "substring_dedup",
    ]
    assert rows[0]["ours_planted_recall"] == 1.0  # 4 planted copies with 0.5% of their words changed
    assert all(r["ours_docs_per_s"] > 0 for r in rows)
    assert rows[-1]["bytes_cut_fraction"] > 0.05  # the 4 planted copies repeat ~1/10 of the bytes
    if datatrove_available():
        assert rows[0]["datatrove_planted_recall"] == 1.0
        assert all(r["speed_ratio"] > 0 for r in rows[:-1])
        assert all(r["decision_agreement"] >= 0.8 for r in rows[1:-1])
