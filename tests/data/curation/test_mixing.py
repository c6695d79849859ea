"""engine/data/curation/mixing.py: temperature weights in closed form, fixed weights, the `curate mix` CLI's blend
string (read back by the trainer's parser), and bad input as one line."""

import math

import pytest

from engine.data.blended_dataset import parse_blend
from engine.data.curate import main
from engine.data.curation.mixing import MixingError, fixed_weights, temperature_weights
from engine.data.indexed_dataset import IndexedDatasetBuilder


def _dataset(path, n_docs: int, doc_len: int) -> str:
    prefix = str(path)
    with IndexedDatasetBuilder(prefix, vocab_size=256) as builder:
        for _ in range(n_docs):
            builder.add_document(list(range(doc_len)))
    return prefix


@pytest.mark.parametrize("temperature, expected", [
    (1.0, {"a": 0.2, "b": 0.8}),              # proportional: 100 / 500, 400 / 500
    (2.0, {"a": 1 / 3, "b": 2 / 3}),          # sqrt: 10 / 30, 20 / 30
    (math.inf, {"a": 0.5, "b": 0.5}),         # uniform
    (1e9, {"a": 0.5, "b": 0.5}),              # T large tends to uniform
    (0.5, {"a": 1 / 17, "b": 16 / 17}),       # squares: 1e4 / 17e4
])  # fmt: skip
def test_temperature_weights_closed_forms(temperature, expected):
    got = temperature_weights({"a": 100, "b": 400}, temperature)
    assert got == pytest.approx(expected, rel=1e-8) and list(got) == ["a", "b"]


def test_temperature_weights_do_not_overflow():
    got = temperature_weights({"a": 1e12, "b": 1e6}, 0.01)
    assert got["a"] == pytest.approx(1.0) and math.isfinite(got["b"])


def test_fixed_weights_are_normalised_in_domain_order():
    assert fixed_weights({"b": 3, "a": 1}, ["a", "b"]) == {"a": 0.25, "b": 0.75}


def test_cli_prints_a_blend_the_trainer_reads(tmp_path, capsys):
    code = _dataset(tmp_path / "code", 10, 30)  # 300 tokens
    prose = _dataset(tmp_path / "prose", 4, 300)  # 1200 tokens, fewer documents
    argv = ["mix", "--domain", f"code={code}", "--domain", f"prose={prose}"]
    assert main([*argv, "--temperature", "2"]) == 0
    blend = parse_blend(capsys.readouterr().out.strip())
    assert [p for _, p in blend] == [code, prose]
    assert [w for w, _ in blend] == pytest.approx([1 / 3, 2 / 3], rel=1e-5)
    assert main([*argv, "--count", "documents"]) == 0  # T = 1 over documents: 10 / 14, 4 / 14
    assert [w for w, _ in parse_blend(capsys.readouterr().out)] == pytest.approx([10 / 14, 4 / 14], rel=1e-5)
    assert main([*argv, "--weights", "prose=1,code=3"]) == 0
    assert capsys.readouterr().out == f"0.75 {code} 0.25 {prose}\n"


@pytest.mark.parametrize("extra, expected", [
    (["--weights", "code=1,web=1"], "weight for unknown domain 'web'; domains: code, prose"),
    (["--weights", "code=1"], "no weight for domain 'prose'"),
    (["--weights", "code=-1,prose=1"], "weight -1.0 for domain 'code' must be finite and >= 0"),
    (["--weights", "code=0,prose=0"], "the weights sum to 0"),
    (["--weights", "code=x,prose=1"], "weight 'x' for domain 'code' is not a number"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--domain", "web=nowhere/web"], "dataset prefix 'nowhere/web': nowhere/web.idx (or its .bin) not found"),
    (["--domain", "code=x"], "--domain 'code' given twice"),
    (["--domain", "web"], "--domain 'web': expected NAME=PREFIX"),
])  # fmt: skip
def test_bad_input_is_one_line(extra, expected, tmp_path, capsys):
    code, prose = _dataset(tmp_path / "code", 2, 5), _dataset(tmp_path / "prose", 2, 5)
    assert main(["mix", "--domain", f"code={code}", "--domain", f"prose={prose}", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_empty_domain_is_refused(tmp_path):
    with pytest.raises(MixingError, match="domain 'a' has size 0"):
        temperature_weights({"a": 0, "b": 5}, 1.0)
