"""The objective recipes of examples/: pretrain_fim_code.py and pretrain_bert.py train 5 steps and exit 0, infill.py
fills in a middle from the FIM checkpoint, and the FIM recipe's default data is the corpus's code documents only."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from engine.config import load_config
from engine.data.corpus import documents
from engine.data.indexed_dataset import IndexedDataset
from engine.data.tokenizer import ByteTokenizer
from tests.train.conftest import build_document_data, tiny_args

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def data(tmp_path, monkeypatch):
    """Short EOD-terminated byte documents (several per 32-token sample) in a private ENGINE_CACHE."""
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    return build_document_data(tmp_path)


def _run_config(run_dir: Path):
    return load_config(["--config", str(next(run_dir.glob("checkpoints/step_*")) / "config.toml")])


def test_fim_recipe_trains_and_infill_fills_the_middle(tmp_path, data, capsys):
    run_dir = tmp_path / "fim"
    args = tiny_args(run_dir, *data, train__steps=5, optim__decay_steps=5, objective__fim_rate=0.9)
    assert _example("pretrain_fim_code").main(args) == 0
    assert _run_config(run_dir).train.objective == "fim"
    capsys.readouterr()

    prefix, suffix = "def f(x):\n", "\n    return y\n"
    infill = _example("infill")
    argv = ["--checkpoint", str(run_dir), "--prefix", prefix, "--suffix", suffix, "--max-new", "12"]
    assert infill.main(argv) == 0  # sampled
    out, err = capsys.readouterr()
    assert out.startswith(prefix) and out.endswith(suffix + "\n") and "warning" not in err
    assert infill.main([*argv, "--temperature", "0"]) == 0  # greedy: the same middle alone and in place
    greedy = capsys.readouterr().out
    assert infill.main([*argv, "--temperature", "0", "--middle-only"]) == 0
    assert greedy == prefix + capsys.readouterr().out[:-1] + suffix + "\n"
    # Near-uniform sampling never draws the ids the model pads its vocabulary with (375..383 for bytes).
    for seed in range(4):
        argv = ["--checkpoint", str(run_dir), "--prefix", "a", "--suffix", "b", "--temperature", "100", "--top-k", "0"]
        assert infill.main([*argv, "--max-new", "27", "--seed", str(seed)]) == 0


def test_bert_recipe_trains_with_mlm(tmp_path, data):
    run_dir = tmp_path / "bert"
    assert _example("pretrain_bert").main(tiny_args(run_dir, *data, train__steps=5, optim__decay_steps=5)) == 0
    assert _run_config(run_dir).train.objective == "mlm"


def test_recipes_pick_their_objective_run_dir_and_code_data(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    seen = []
    for name in ("pretrain_fim_code", "pretrain_bert"):
        module = _example(name)
        module.train_main = seen.append  # the argv engine.train.main would get
        module.main(["--data.tokenizer", "byte"])
        module.main(["--data.tokenizer", "byte", "--run.dir", "elsewhere", "--data.path", "mine"])
    fim, fim_own, bert, bert_own = (load_config(argv) for argv in seen)
    assert (fim.train.objective, fim.run.dir, bert.train.objective, bert.run.dir) == (
        "fim", "runs/fim_code", "mlm", "runs/bert"
    )  # fmt: skip
    assert (fim_own.run.dir, fim_own.data.path, bert_own.run.dir) == ("elsewhere", "mine", "elsewhere")

    # The FIM recipe's default data: the embedded corpus's code documents, each split, EOD-terminated.
    tok = ByteTokenizer()
    for prefix, split in ((fim.data.path, "train"), (fim.data.valid_path, "valid")):
        assert "embedded_code" in prefix
        ds = IndexedDataset(prefix)
        code = [d.text for d in documents(split) if d.name.startswith("code/")]
        assert ds.num_documents == len(code) > 0
        for i in (0, ds.num_documents - 1):
            ids = np.asarray(ds[i]).tolist()
            assert ids[-1] == tok.eod_id and tok.decode(ids[:-1]) == code[i]
