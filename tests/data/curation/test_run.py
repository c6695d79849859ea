"""End to end: `curate` over files, the report, the process pool, TOML pipelines, and the CLI's bad-input lines."""

import datetime
import glob
import gzip
import json
import os

import pytest

from engine.data.curate import main
from engine.data.curation.documents import document_writer
from engine.data.curation.pipeline import Pipeline
from engine.data.curation.runner import curate
from engine.data.curation.steps import CurationError
from tests.data.curation.corpus import prose, read_jsonl, write_jsonl

ALL_STEPS = "exact_dedup,minhash_dedup,gopher_repetition,gopher_quality,c4,fineweb,pii"


def run(inputs, out, steps=ALL_STEPS, **kw):
    return curate([str(p) for p in inputs], str(out), Pipeline.from_names(steps.split(",")), progress=False, **kw)


def outputs(out) -> list[dict]:
    return [d for path in sorted(glob.glob(f"{out}/*.jsonl*")) for d in read_jsonl(path)]


def test_pipeline_keeps_fields_and_reports_every_step(tmp_path):
    near = prose(3).replace("The", "A", 1)  # one word changed: a near duplicate of document a3
    a = write_jsonl(
        tmp_path / "a.jsonl",
        [{"id": f"a{i}", "text": prose(i), "meta": {"n": i, "tags": ["x"]}} for i in range(5)]
        + [{"id": "mail", "text": prose(9) + " Write to jane@corp.io.", "meta": {"n": 9}}],
    )
    b = write_jsonl(
        tmp_path / "b.jsonl.gz",
        [
            {"id": "exact", "text": prose(1)},  # an exact copy of a1
            {"id": "near", "text": near},
            {"id": "short", "text": prose(30, sentences=2)},  # 24 words
            {"id": "b0", "text": prose(20), "url": "http://x"},
        ],
    )
    report = run([a, b], tmp_path / "out")
    docs = {d["id"]: d for d in outputs(tmp_path / "out")}
    assert sorted(docs) == ["a0", "a1", "a2", "a3", "a4", "b0", "mail"]
    assert docs["a2"] == {"id": "a2", "text": prose(2), "meta": {"n": 2, "tags": ["x"]}}
    assert docs["b0"]["url"] == "http://x"
    assert "jane@corp.io" not in docs["mail"]["text"] and "email@example.com" in docs["mail"]["text"]
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["exact_dedup"]["removed"] == {"exact_duplicate": 1}
    assert steps["minhash_dedup"]["removed"] == {"near_duplicate": 1}
    assert steps["gopher_repetition"]["removed"] == {} and steps["gopher_quality"]["removed"] == {"gopher_short_doc": 1}
    assert steps["pii"]["documents_changed"] == 1 and steps["pii"]["bytes_out"] - steps["pii"]["bytes_in"] == len(
        "email@example.com"
    ) - len("jane@corp.io")
    (sample,) = steps["minhash_dedup"]["samples"]
    assert sample["id"] == "near" and sample["duplicate_of"] == f"{a}:4" and sample["file"] == b
    assert steps["gopher_quality"]["samples"][0]["line"] == 3
    for before, after in zip(report["steps"], report["steps"][1:]):
        assert before["documents_out"] == after["documents_in"] and before["bytes_out"] == after["bytes_in"]
    assert report["documents_in"] == 10 and report["documents_out"] == 7
    assert report["bytes_out"] == sum(len(d["text"].encode()) for d in docs.values())
    assert json.load(open(tmp_path / "out" / "report.json"))["documents_out"] == 7


def test_exact_dedup_keeps_the_first_in_input_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "a0", "text": "same"}, {"id": "a1", "text": "other"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "b0", "text": "x"}, {"id": "b1", "text": "same"}])
    c = write_jsonl(tmp_path / "c.jsonl", [{"id": "c0", "text": "x"}, {"id": "c1", "text": "x"}])
    run([b, a, c], tmp_path / "out", steps="exact_dedup")
    assert [d["id"] for d in outputs(tmp_path / "out")] == ["b0", "b1", "a1"]  # files named 00000_b, 00001_a, ...


def test_a_process_pool_gives_the_same_output(tmp_path):
    files = [
        write_jsonl(tmp_path / f"in{i}.jsonl", [{"id": f"{i}-{j}", "text": prose(j % 5 + i)} for j in range(6)])
        for i in range(3)
    ]
    one = run(files, tmp_path / "one")
    two = run(files, tmp_path / "two", workers=2)
    for x, y in zip(sorted(glob.glob(f"{tmp_path}/one/*.gz")), sorted(glob.glob(f"{tmp_path}/two/*.gz"))):
        assert gzip.open(x).read() == gzip.open(y).read()
    assert [s["removed"] for s in one["steps"]] == [s["removed"] for s in two["steps"]]
    assert one["documents_out"] == two["documents_out"] == 7


def test_text_files_and_plain_jsonl_output(tmp_path):
    (tmp_path / "doc.txt").write_text(prose(1))
    write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "text": prose(1)}])
    report = run([tmp_path / "doc.txt", tmp_path / "d.jsonl"], tmp_path / "out", "exact_dedup", output_format="jsonl")
    assert read_jsonl(tmp_path / "out" / "00000_doc.jsonl") == [{"id": "doc.txt", "text": prose(1)}]
    assert read_jsonl(tmp_path / "out" / "00001_d.jsonl") == [] and report["documents_out"] == 1


def test_toml_pipeline(tmp_path):
    (tmp_path / "p.toml").write_text(
        'text_key = "body"\n[[steps]]\nname = "gopher_quality"\nmin_doc_words = 3\n'
        '[[steps]]\nname = "gopher_repetition"\ntop_n_grams = {2 = 0.5}\n'
    )
    pipeline = Pipeline.from_toml(str(tmp_path / "p.toml"))
    assert pipeline.text_key == "body" and pipeline.steps[0].min_doc_words == 3
    assert pipeline.steps[1].top_n_grams == {2: 0.5}
    write_jsonl(tmp_path / "d.jsonl", [{"body": "the cat and the dog"}, {"body": "one two"}])
    assert main(["--input", str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "o"), "--pipeline",
                 str(tmp_path / "p.toml"), "--no-progress"]) == 0  # fmt: skip
    assert read_jsonl(tmp_path / "o" / "00000_d.jsonl.gz") == [{"body": "the cat and the dog"}]
    (tmp_path / "bad.toml").write_text('[[steps]]\nname = "c4"\nmin_sentences = 3\n')
    with pytest.raises(CurationError, match="step 'c4': unknown parameter 'min_sentences'"):
        Pipeline.from_toml(str(tmp_path / "bad.toml"))


def cli(capsys, *args) -> tuple[int, str]:
    rc = main([*map(str, args), "--no-progress"])
    return rc, capsys.readouterr().err.strip()


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": prose(1)}])
    rc, err = cli(capsys, "--input", tmp_path / "missing.jsonl", "--output", tmp_path / "o1")
    assert rc == 2 and err == f"error: input not found: {tmp_path / 'missing.jsonl'}"
    rc, err = cli(capsys, "--input", good, "--output", tmp_path / "o2", "--steps", "exact_dedup,fuzzy")
    assert rc == 2 and err == (
        "error: unknown step 'fuzzy'; known steps: "
        "c4, exact_dedup, fineweb, gopher_quality, gopher_repetition, language_id, minhash_dedup, pii, substring_dedup"
    )
    write_jsonl(tmp_path / "k.jsonl", [{"text": "a"}, {"content": "b", "id": 2}])
    rc, err = cli(capsys, "--input", tmp_path / "k.jsonl", "--output", tmp_path / "o3", "--steps", "pii")
    assert rc == 2 and err == f"error: {tmp_path / 'k.jsonl'}:2: no text key 'text' (keys: content, id); set --text-key"
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    rc, err = cli(capsys, "--input", tmp_path / "bad.jsonl.gz", "--output", tmp_path / "o4", "--steps", "pii")
    assert rc == 2 and err.startswith(f"error: {tmp_path / 'bad.jsonl.gz'}: cannot read") and "\n" not in err
    (tmp_path / "x.csv").write_text("a,b\n")
    rc, err = cli(capsys, "--input", tmp_path / "x.csv", "--output", tmp_path / "o5")
    assert rc == 2 and err.startswith(f"error: {tmp_path / 'x.csv'}: unknown input format")
    rc, err = cli(capsys, "--input", good, "--output", tmp_path / "o2", "--steps", "pii", "--workers", "0")
    assert rc == 2 and err == "error: workers must be >= 1, got 0"


def test_cli_resumes_only_the_same_run(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": prose(1)}])
    assert cli(capsys, "--input", good, "--output", tmp_path / "o", "--steps", "pii")[0] == 0
    rc, err = cli(capsys, "--input", good, "--output", tmp_path / "o", "--steps", "exact_dedup")
    assert (
        rc == 2
        and err
        == f"error: {tmp_path / 'o'} holds a curation run with other inputs or steps; use a new --output or remove it"
    )


def test_cli_refuses_a_non_empty_directory_that_holds_no_run(tmp_path, capsys):
    """Its files would be overwritten (a report.json, a shard's name): refused, every file left as it was; the input's
    own directory too."""
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": prose(1)}])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text("my notes")
    for out in (mine, tmp_path):
        rc, err = cli(capsys, "--input", good, "--output", out, "--steps", "pii")
        assert rc == 2 and err == (f"error: {out}: a non-empty directory that holds no curation run (its files would "
                                   "be overwritten); use a new --output")  # fmt: skip
    assert (mine / "report.json").read_text() == "my notes"
    assert sorted(p.name for p in mine.iterdir()) == ["report.json"]


def test_parquet_needs_pyarrow(tmp_path, capsys):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        rc, err = cli(capsys, "--input", tmp_path / "d.parquet", "--output", tmp_path / "o", "--steps", "pii")
        assert (
            rc == 2 and err == f"error: {tmp_path / 'd.parquet'}: reading parquet needs pyarrow (pip install pyarrow)"
        )
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2], "text": ["a@b.com", "x"]}), tmp_path / "d.parquet")
    assert cli(capsys, "--input", tmp_path / "d.parquet", "--output", tmp_path / "o", "--steps", "pii")[0] == 0
    assert outputs(tmp_path / "o")[0] == {"id": 1, "text": "email@example.com"}


def test_malformed_lines_are_skipped_named_and_counted(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n{broken\n[1, 2]\n\n" + json.dumps({"text": "two"}) + "\n")
    rc, err = cli(capsys, "--input", path, "--output", tmp_path / "o", "--steps", "exact_dedup")
    assert rc == 0
    assert err.splitlines() == [
        f"warning: {path}:2: malformed JSON (Expecting property name enclosed in double quotes at column 2)",
        f"warning: {path}:3: malformed JSON (a list, not an object)",
    ]
    report = json.load(open(tmp_path / "o" / "report.json"))
    assert report["malformed_lines"] == 2 and report["documents_out"] == 2
    assert [d["text"] for d in outputs(tmp_path / "o")] == ["one", "two"]
    assert os.path.exists(tmp_path / "o" / ".curation" / "manifest.json")


def test_writer_gzip_round_trip_and_values_json_lacks(tmp_path):
    with document_writer(str(tmp_path / "w.jsonl.gz")) as write:
        write({"text": "é", "when": datetime.date(2020, 1, 2), "n": [1]})
    assert read_jsonl(tmp_path / "w.jsonl.gz") == [{"text": "é", "when": "2020-01-02", "n": [1]}]
    assert not list(tmp_path.glob(".*tmp*"))  # renamed into place
    # the gzip header names the final file, not the temporary one: the same documents give the same bytes
    assert (tmp_path / "w.jsonl.gz").read_bytes()[10:].startswith(b"w.jsonl\x00")
    first = (tmp_path / "w.jsonl.gz").read_bytes()
    with document_writer(str(tmp_path / "w.jsonl.gz")) as write:
        write({"text": "é", "when": datetime.date(2020, 1, 2), "n": [1]})
    assert (tmp_path / "w.jsonl.gz").read_bytes() == first
