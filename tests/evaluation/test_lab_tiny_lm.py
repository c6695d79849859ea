"""examples/lab_tiny_lm.py: a smoke run on a local WikiText-style copy writes a report whose perplexity is the
trainer's, and a loss-curve PNG; bad input is one line."""

import importlib.util
import inspect
import json
import math
import re
from pathlib import Path

import pytest

from engine.data.indexed_dataset import IndexedDataset
from engine.metrics import read_metrics

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _lab():
    spec = importlib.util.spec_from_file_location("_example_lab_tiny_lm", EXAMPLES / "lab_tiny_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wikitext(root: Path) -> Path:
    """wiki.train.raw / wiki.valid.raw in WikiText's layout: articles under ` = Title = `, sections ` = = S = = `."""
    paragraphs = [p for p in inspect.getsource(json.decoder).split("\n\n") if len(p) > 40]
    root.mkdir()
    for name, part, n in (("train", paragraphs[:-6], 5), ("valid", paragraphs[-6:], 2)):
        lines = []
        for a in range(n):
            lines += [f" = Article {a} = \n", " \n", " = = Section = = \n", " \n"]
            lines += [f" {p.replace(chr(10), ' ')} \n" for p in part[a::n]]
        (root / f"wiki.{name}.raw").write_text("".join(lines))
    return root


def test_smoke_run_writes_the_report_and_the_curve(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    wiki, run = _wikitext(tmp_path / "wikitext"), tmp_path / "run"
    lab = _lab()
    argv = ["--tiny", "--tokenizer", "byte", "--steps", "6", "--threads", "1", "--wikitext", str(wiki),
            "--run-dir", str(run)]  # fmt: skip
    assert lab.main(argv) == 0
    assert len(IndexedDataset(str(run / "data" / "train"))) == 5  # one document per article
    report = (run / "report.md").read_text()
    final = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r][-1]
    assert final["step"] == 6
    ppl = float(re.search(r"validation perplexity: \*\*([0-9.]+)\*\*", report).group(1))
    assert ppl == pytest.approx(math.exp(final["val_loss"]), rel=1e-6) and ppl == pytest.approx(final["val_ppl"])
    n = int(re.search(r"\*\*([0-9,]+) parameters\*\*", report).group(1).replace(",", ""))
    assert n == sum(p.numel() for p in lab.load_model(str(run))[0].parameters())
    assert "WikiText-103" in report and "~~~~\nThe " in report  # the sample continues the prompt
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in report and not (run / "loss_curve.png").exists()
    else:
        assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "![loss curve](loss_curve.png)" in report
    assert lab.main(argv) == 2  # the run directory now holds a run


@pytest.mark.parametrize("case, expected", [
    ("missing", r"--wikitext .*nope does not exist \(nothing is downloaded"),
    ("empty", r"holds neither wiki.train.raw \+ wiki.valid.raw nor train-\*.parquet"),
    ("steps", "--steps must be >= 1, got 0"),
])  # fmt: skip
def test_bad_input_is_one_line(case, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / ("nope" if case == "missing" else "wikitext")
    if case != "missing":
        path.mkdir()
    argv = ["--tiny", "--wikitext", str(path), "--run-dir", str(tmp_path / "run")]
    assert _lab().main([*argv, "--steps", "0" if case == "steps" else "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(expected, err), err
    assert not (tmp_path / "run").exists()


def test_articles_split_at_titles_and_stop_past_the_cap(tmp_path):
    wiki = _wikitext(tmp_path / "wikitext")
    lab = _lab()
    train, valid = lab.wikitext_files(str(wiki))
    docs = lab.articles(train)
    assert [d.splitlines()[0] for d in docs] == [f" = Article {a} = " for a in range(5)]
    assert all(" = = Section = = \n" in d for d in docs)  # sections stay inside their article
    assert lab.articles(train, max_chars=len(docs[0]) + 1) == docs[:2]  # the article that passes the cap is kept


def test_parquet_without_pyarrow_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("pyarrow is installed")
    wiki = tmp_path / "wikitext"
    wiki.mkdir()
    for name in ("train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"):
        (wiki / name).write_bytes(b"PAR1")
    assert _lab().main(["--tiny", "--wikitext", str(wiki), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs pyarrow" in err, err
