"""examples/pretrain_mtp.py trains an MTP checkpoint (both kinds) and examples/mtp_speculative.py decodes from it
with self-speculative drafts: the text is the main head's greedy decoding, with an acceptance rate reported."""

import re

import pytest
import torch

from engine.config import load_config
from engine.model.generate import generate
from tests.objectives.test_examples_objectives import _example
from tests.train.conftest import build_document_data, tiny_args


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_recipe_trains_and_speculative_decoding_is_the_greedy_decoding(tmp_path, monkeypatch, capsys, kind):
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "mtp"
    args = tiny_args(run_dir, *build_document_data(tmp_path), train__steps=5, optim__decay_steps=5,
                     objective__mtp_kind=kind)  # fmt: skip
    assert _example("pretrain_mtp").main(args) == 0
    cfg = load_config(["--config", str(next(run_dir.glob("checkpoints/step_*")) / "config.toml")])
    assert (cfg.train.objective, cfg.objective.mtp_depth, cfg.objective.mtp_kind) == ("mtp", 2, kind)
    capsys.readouterr()

    spec = _example("mtp_speculative")
    model, tok = spec.load_mtp_model(str(run_dir))
    prompt = tok.encode("def f")
    greedy = generate(model, torch.tensor([prompt]), 20, temperature=0)[0].tolist()
    for draft in (1, 2):
        out, drafted, accepted, steps = spec.speculative_greedy(model, prompt, 20, draft, tok.vocab_size)
        assert out == greedy and 0 <= accepted <= drafted == draft * steps
        produced = 2 * steps + accepted  # each verification gives t_n, the accepted drafts and the main head's next
        assert produced - (2 + draft) < 20 <= produced  # cut to 20 in the last one
    assert spec.main(["--checkpoint", str(run_dir), "--prompt", "def f", "--max-new", "20"]) == 0
    text, line = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    assert text == tok.decode(greedy)
    assert re.fullmatch(r"acceptance rate \d\.\d{3} \(\d+/\d+ drafted tokens accepted\), .* verifications\)", line)
    assert spec.main(["--checkpoint", str(run_dir), "--draft", "3"]) == 2  # deeper than the checkpoint's modules
    assert "--draft must be in [1, 2]" in capsys.readouterr().err


def test_recipe_defaults_give_way_to_flags():
    module = _example("pretrain_mtp")
    seen = []
    module.train_main = seen.append  # the argv engine.train.main would get
    module.main(["--data.tokenizer", "byte"])
    module.main(["--objective.mtp_depth", "3", "--run.dir", "elsewhere"])
    ours, theirs = (load_config(argv) for argv in seen)
    assert (ours.train.objective, ours.objective.mtp_depth, ours.run.dir) == ("mtp", 2, "runs/mtp")
    assert (theirs.train.objective, theirs.objective.mtp_depth, theirs.run.dir) == ("mtp", 3, "elsewhere")
