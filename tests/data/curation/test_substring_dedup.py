"""Exact-substring dedup: the suffix-array repeats against a brute force, C++ and NumPy agreement, planted repeats
at and below the 50-byte threshold, UTF-8 boundaries, chunking, and the step in a curation run and the CLI."""

import json
import random
import string

import numpy as np
import pytest

from engine.data.curate import main
from engine.data.curation.pipeline import Pipeline
from engine.data.curation.runner import curate
from engine.data.curation.steps import CurationError, make_step
from engine.data.curation.substring_dedup import SubstringDedup, apply_cuts
from engine.data.curation.suffix_array import corpus_symbols, cpp_available, later_repeats
from tests.data.curation.corpus import read_jsonl, write_jsonl

NO_CPP = pytest.mark.skipif(not cpp_available(), reason="engine.data.curation._suffix_array is not built")
IMPLS = ["numpy", pytest.param("cpp", marks=NO_CPP)]


def filler(seed: int, n: int) -> str:
    """Random lower-case text: no 50-byte substring repeats by chance."""
    return "".join(random.Random(seed).choices(string.ascii_lowercase + " ", k=n))


def dedup(texts: list[str], impl: str, **params) -> list[str | None]:
    """The texts after substring dedup (None for a document it emptied)."""
    step = SubstringDedup(impl=impl, **params)
    raw = [t.encode() for t in texts]
    cuts = step.find_cuts(np.frombuffer(b"".join(raw), dtype=np.uint8), step.keys(texts)[:, 0])
    out: list[str | None] = []
    for k, text in enumerate(texts):
        sel = cuts.doc == k
        out.append(None if k in cuts.emptied else apply_cuts(text, list(zip(cuts.start[sel], cuts.end[sel]))))
    return out


def brute_later_repeats(sym: np.ndarray) -> np.ndarray:
    n = len(sym)
    best = np.zeros(n, dtype=np.int64)
    for i in range(n):
        for j in range(i):
            h = 0
            while i + h < n and sym[i + h] == sym[j + h]:
                h += 1
            best[i] = max(best[i], h)
    return best


@pytest.mark.parametrize("impl", IMPLS)
def test_later_repeats_match_a_brute_force(impl):
    rng = np.random.default_rng(0)
    for _ in range(60):
        lengths = rng.integers(0, 12, size=rng.integers(1, 5))
        sym, _ = corpus_symbols(rng.integers(0, 3, size=lengths.sum()).astype(np.uint8), lengths)
        length, source = later_repeats(sym, impl)
        assert length.tolist() == brute_later_repeats(sym).tolist()
        for i in np.flatnonzero(length):  # the source is an earlier occurrence
            assert source[i] < i and (sym[i : i + length[i]] == sym[source[i] : source[i] + length[i]]).all()


@NO_CPP
def test_cpp_suffix_array_sorts_the_suffixes():
    from engine.data.curation import _suffix_array

    rng = np.random.default_rng(2)
    for k in range(150):  # SA-IS from 40 symbols (shorter strings use prefix doubling); periodic strings recurse deep
        sym = rng.integers(0, 1 + k % 4, size=rng.integers(1, 200)).astype(np.int32)
        if k % 3 == 0:
            sym = np.tile(sym[: max(1, len(sym) // 7)], 8)[: len(sym)]
        expected = sorted(range(len(sym)), key=lambda i: sym[i:].tolist())
        assert _suffix_array.suffix_array(sym, int(sym.max()) + 1).tolist() == expected


@NO_CPP
def test_cpp_and_numpy_agree_on_random_corpora():
    rng = np.random.default_rng(1)
    for alphabet in (2, 4, 256):
        lengths = rng.integers(0, 400, size=30)
        sym, _ = corpus_symbols(rng.integers(0, alphabet, size=lengths.sum()).astype(np.uint8), lengths)
        cpp, ref = later_repeats(sym, "cpp"), later_repeats(sym, "numpy")
        assert cpp[0].tolist() == ref[0].tolist() and cpp[1].tolist() == ref[1].tolist()


@pytest.mark.parametrize("impl", IMPLS)
def test_planted_repeats_cut_from_later_copies_only(impl):
    long, short = filler(100, 50), filler(101, 49)
    first = filler(1, 80) + long + filler(2, 60) + short + filler(3, 40)
    second = filler(4, 30) + short + filler(5, 70) + long + filler(6, 20)
    third = filler(7, 90) + long[:-1] + filler(8, 10)  # 49 bytes of the long one: below the threshold
    out = dedup([first, second, third], impl)
    assert out[0] == first
    assert out[1] == filler(4, 30) + short + filler(5, 70) + filler(6, 20)
    assert out[2] == third


@pytest.mark.parametrize("impl", IMPLS)
def test_repeats_within_a_document_and_emptied_copies(impl):
    block = filler(9, 64)
    text = filler(10, 30) + block + filler(11, 30) + block + block
    copy = filler(12, 100)
    out = dedup([text, copy, copy], impl)
    assert out[0] == filler(10, 30) + block + filler(11, 30)
    assert out[1:] == [copy, None]  # the exact copy loses all its text and is dropped


def test_cuts_keep_whole_utf8_characters():
    body = filler(13, 60)
    # é = C3 A9 and ĩ = C4 A9 share their last byte, € = E2 82 AC and ₠ = E2 82 A0 their first two: the byte match
    # A9 + body + E2 82 starts and ends inside characters, which stay whole
    out = dedup(["é" + body + "€", "ĩ" + body + "₠z"], "numpy")
    assert out == ["é" + body + "€", "ĩ₠z"]


def test_chunks_miss_repeats_across_them_and_find_those_within():
    block = filler(14, 100)
    texts = [filler(15, 300) + block, filler(16, 300) + block, filler(17, 300) + block]
    step = SubstringDedup(memory_budget_mb=1)
    assert step.chunk_bytes() < 10**6
    assert dedup(texts, "numpy", memory_budget_mb=1) == [texts[0], texts[1][:300], texts[2][:300]]
    step.chunk_bytes = lambda: 802  # two documents (with their separators) per chunk
    raw = np.frombuffer("".join(texts).encode(), dtype=np.uint8)
    cuts = step.find_cuts(raw, step.keys(texts)[:, 0])
    assert cuts.doc.tolist() == [1]  # the third document is alone in its chunk: its copy is not found


def test_step_parameters_and_position_are_checked():
    with pytest.raises(CurationError, match="min_length must be a positive integer"):
        make_step("substring_dedup", {"min_length": 0})
    with pytest.raises(CurationError, match="must be the last step"):
        Pipeline.from_names(["substring_dedup", "pii"])


def test_curation_run_and_cli(tmp_path, capsys):
    boiler = " Subscribe to our newsletter for the latest updates on everything we publish."  # 77 bytes
    docs = [{"id": f"d{i}", "text": filler(20 + i, 200) + boiler, "n": i} for i in range(4)]
    docs.append({"id": "copy", "text": docs[0]["text"]})
    a = write_jsonl(tmp_path / "a.jsonl", docs[:3])
    b = write_jsonl(tmp_path / "b.jsonl", docs[3:] + [{"id": "dropped", "text": "x" * 10}])
    report = curate([a, b], str(tmp_path / "out"), Pipeline.from_names(["substring_dedup"]), progress=False)
    out = read_jsonl(tmp_path / "out" / "00000_a.jsonl.gz") + read_jsonl(tmp_path / "out" / "00001_b.jsonl.gz")
    assert [d["id"] for d in out] == ["d0", "d1", "d2", "d3", "dropped"]
    assert out[0]["text"] == docs[0]["text"] and out[0]["n"] == 0
    assert [d["text"] for d in out[1:4]] == [filler(20 + i, 200) for i in (1, 2, 3)]
    step = report["steps"][0]
    assert step["removed"] == {"substring_duplicate": 1} and step["documents_changed"] == 3
    assert step["bytes_in"] - step["bytes_out"] == 3 * 77 + 277
    assert step["samples"][0]["duplicate_of"].endswith("a.jsonl:1")
    assert report["bytes_out"] == step["bytes_out"]

    toml = tmp_path / "p.toml"
    toml.write_text('[[steps]]\nname = "exact_dedup"\n\n[[steps]]\nname = "substring_dedup"\nmin_length = 100\n')
    assert main(["--input", a, b, "--output", str(tmp_path / "cli"), "--pipeline", str(toml), "--no-progress"]) == 0
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert [s["removed"] for s in report["steps"]] == [{"exact_duplicate": 1}, {}]  # the boilerplate is < 100 bytes
    capsys.readouterr()
    assert main(["--input", a, "--output", str(tmp_path / "bad"), "--steps", "substring_dedup,c4"]) == 2
    assert "must be the last step" in capsys.readouterr().err
