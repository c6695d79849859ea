"""Preprocess: round trips to IndexedDataset, identical output for any --workers, the CLI, bad input, interruption."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from engine.data.indexed_dataset import IndexedDataset
from engine.data.preprocess import PreprocessError, main, preprocess
from engine.data.tokenizer import ByteTokenizer

DOCS = [
    "def f(x):\n    return x * 2\n",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café — 日本語 🙂",
    "",  # empty documents are skipped
    "line one\nline two\n\n",
    "<|endoftext|> in text stays text",
] + [f"document number {i}: " + "word " * (i % 7) for i in range(40)]
KEPT = [d for d in DOCS if d]


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "id": len(d)}) + "\n")
    return str(path)


def decoded(prefix, tok):
    ds = IndexedDataset(prefix)
    return [tok.decode(ds[i]) for i in range(len(ds))]


def no_leftovers(directory, prefix_name):
    """Only finished outputs remain: no temporary files from the builder."""
    return [p for p in os.listdir(directory) if p.startswith(".") and prefix_name in p] == []


def test_jsonl_round_trip_byte_exact(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", DOCS)
    stats = preprocess([src], str(tmp_path / "out"), "byte")
    tok = ByteTokenizer()
    assert decoded(tmp_path / "out", tok) == [d + "<|endoftext|>" for d in KEPT]
    ds = IndexedDataset(str(tmp_path / "out"))
    assert ds.dtype == np.uint16 and ds.document_indices.tolist() == list(range(len(KEPT) + 1))
    assert (stats.documents, stats.skipped_empty) == (len(KEPT), 1)
    assert stats.tokens == sum(len(d.encode()) + 1 for d in KEPT) == ds.num_tokens


def test_bpe_round_trip(tmp_path, bpe_tokenizer, engine_cache):
    ascii_docs = [d for d in KEPT if d.isascii()]
    src = write_jsonl(tmp_path / "in.jsonl", ascii_docs)
    preprocess([src], str(tmp_path / "out"), "bpe", cache_dir=engine_cache, append_eod=False)
    ds = IndexedDataset(str(tmp_path / "out"))
    assert [bpe_tokenizer.decode(ds[i]) for i in range(len(ds))] == ascii_docs
    assert [ds[i].tolist() for i in range(len(ds))] == bpe_tokenizer.encode_batch(ascii_docs)


def test_workers_give_identical_output(tmp_path, bpe_tokenizer):
    tok_path = str(tmp_path / "tokenizer.json")
    bpe_tokenizer.save(tok_path)
    src = write_jsonl(tmp_path / "in.jsonl", DOCS)
    outs = []
    for workers in (1, 2):
        out = str(tmp_path / f"w{workers}")
        argv = ["--input", src, "--tokenizer", tok_path, "--output-prefix", out, "--workers", str(workers)]
        assert main(argv + ["--chunk-docs", "3", "--no-progress"]) == 0
        outs.append(out)
    for ext in (".bin", ".idx"):
        assert open(outs[0] + ext, "rb").read() == open(outs[1] + ext, "rb").read()
    assert [bpe_tokenizer.decode(x) for x in IndexedDataset(outs[1])[:]] == [d + "<|endoftext|>" for d in KEPT]


def test_plain_text_globs_and_gzip(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second")
    (d / "a.txt").write_text("first")
    (d / "sub" / "c.txt").write_text("third")
    with gzip.open(d / "z.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "zipped"}) + "\n\n")
    prefix = str(tmp_path / "out")
    stats = preprocess([str(d / "**" / "*.txt"), str(d / "*.gz")], prefix, "byte", json_key="body", append_eod=False)
    assert decoded(prefix, ByteTokenizer()) == ["first", "second", "third", "zipped"]  # globs expand sorted
    assert stats.documents == 4


def test_embedded_split(tmp_path):
    from engine.data.corpus import documents

    prefix = str(tmp_path / "valid")
    preprocess(["embedded"], prefix, "byte", split="valid", append_eod=False)
    assert decoded(prefix, ByteTokenizer()) == [d.text for d in documents("valid")]


def test_cli_final_line_and_help(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", DOCS[:3])
    assert main(["--input", src, "--tokenizer", "byte", "--output-prefix", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "3 docs" in out[0] and "docs/s" in out[0] and "tokens/s per worker" in out[0]
    # The module entry point runs as documented.
    r = subprocess.run([sys.executable, "-m", "engine.data.preprocess", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ("--input", "--output-prefix", "--tokenizer", "--json-key", "--workers", "--split", "--progress"):
        assert flag in r.stdout


def test_cli_never_overwrites_an_input_or_existing_output_unasked(tmp_path, capsys):
    """An existing PREFIX.bin/.idx needs --force; an output that is one of the inputs is refused even with it; a
    prefix ending in a separator names no file."""
    src = write_jsonl(tmp_path / "in.jsonl", DOCS[:3])
    prefix = str(tmp_path / "o")
    assert main(["--input", src, "--tokenizer", "byte", "--output-prefix", prefix]) == 0
    before = (tmp_path / "o.bin").read_bytes()
    capsys.readouterr()
    other = write_jsonl(tmp_path / "other.jsonl", DOCS[:1])
    assert main(["--input", other, "--tokenizer", "byte", "--output-prefix", prefix]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {prefix}.bin exists; pass --force to replace it, or choose another --output-prefix"
    assert (tmp_path / "o.bin").read_bytes() == before
    assert main(["--input", other, "--tokenizer", "byte", "--output-prefix", prefix, "--force"]) == 0
    assert (tmp_path / "o.bin").read_bytes() != before
    victim = tmp_path / "text.bin"
    victim.write_text("some text that is not tokens\n")
    capsys.readouterr()
    for force in ([], ["--force"]):
        assert main(["--input", str(victim), "--output-prefix", str(tmp_path / "text"), *force]) == 2
        assert "would overwrite the input" in capsys.readouterr().err
    assert victim.read_text() == "some text that is not tokens\n"
    assert main(["--input", src, "--output-prefix", str(tmp_path) + "/"]) == 2
    assert "names a directory" in capsys.readouterr().err


# ---- bad input ------------------------------------------------------------------------------------------------


def cli_error(argv, capsys):
    code = main(argv + ["--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_missing_inputs_are_named(tmp_path, capsys):
    src = write_jsonl(tmp_path / "ok.jsonl", DOCS)
    err = cli_error(["--input", src, "nope.jsonl", str(tmp_path / "*.txt"), "--output-prefix", "x"], capsys)
    assert "nope.jsonl" in err and "*.txt (glob matched no files)" in err and "ok.jsonl" not in err


def test_empty_corpus(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = cli_error(["--input", str(empty), "--tokenizer", "byte", "--output-prefix", str(tmp_path / "o")], capsys)
    assert "empty corpus: no documents" in err and str(empty) in err
    blanks = write_jsonl(tmp_path / "blank.jsonl", ["", ""])
    err = cli_error(["--input", blanks, "--tokenizer", "byte", "--output-prefix", str(tmp_path / "o")], capsys)
    assert "all documents are empty" in err
    assert not os.path.exists(tmp_path / "o.idx") and no_leftovers(tmp_path, "o.")


@pytest.mark.parametrize(
    "line, needle",
    [("{bad json", "in.jsonl:3: invalid JSON"), ('{"other": 1}', "in.jsonl:3: no key 'text'"), ('{"text": 5}', "int")],
)
def test_bad_json_line_leaves_no_output(tmp_path, line, needle):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, DOCS[:2])
    with open(src, "a") as f:
        f.write(line + "\n")
    prefix = str(tmp_path / "out")
    with pytest.raises(PreprocessError, match=needle):
        preprocess([str(src)], prefix, "byte", chunk_docs=1)
    assert not os.path.exists(prefix + ".idx") and not os.path.exists(prefix + ".bin")
    assert no_leftovers(tmp_path, "out.")


def test_interrupted_run_leaves_no_idx(tmp_path, monkeypatch, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", DOCS)
    prefix = str(tmp_path / "out")
    calls = []

    def flaky(self, texts):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return [list(t.encode()) for t in texts]

    monkeypatch.setattr(ByteTokenizer, "encode_batch", flaky)
    code = main(["--input", src, "--tokenizer", "byte", "--output-prefix", prefix, "--chunk-docs", "2"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert not os.path.exists(prefix + ".idx") and no_leftovers(tmp_path, "out.")


def test_other_bad_arguments(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", DOCS)
    for flag in ("--workers", "--chunk-docs"):
        err = cli_error(["--input", src, "--output-prefix", "o", flag, "0"], capsys)
        assert f"{flag} must be at least 1" in err
    assert "is a directory" in cli_error(["--input", str(tmp_path), "--output-prefix", "o"], capsys)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    assert "not UTF-8" in cli_error(["--input", str(bad), "--tokenizer", "byte", "--output-prefix", "o"], capsys)
    assert "tokenizer 'nope'" in cli_error(["--input", src, "--tokenizer", "nope", "--output-prefix", "o"], capsys)
