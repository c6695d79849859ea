"""engine/data/curation/doremi.py: the DoReMi weight update against hand-computed values, and the rounds procedure
end to end on two byte-level domains, one of them random bytes (nothing to learn: DoReMi moves weight off it)."""

import json
import math
import shlex
import sys

import pytest

from engine.config import load_config
from engine.data.blended_dataset import parse_blend
from engine.data.curate import main
from engine.data.curation import doremi
from engine.data.curation.doremi import (
    DoReMiError,
    average_weights,
    clipped_excess,
    doremi_update,
    run_doremi,
    subprocess_trainer,
)
from engine.train import train
from tests.train.blend_data import build_domain_data

TINY = ["--model.n_layers", "1", "--model.d_model", "32", "--model.n_heads", "2", "--model.seq_len", "32",
        "--train.global_batch", "8", "--data.tokenizer", "byte", "--eval.batches", "2", "--optim.lr", "1e-2",
        "--optim.warmup", "2", "--run.progress", "false", "--run.tensorboard", "false"]  # fmt: skip


def test_update_matches_hand_computed_values():
    # α' ∝ α exp(η λ): 0.5·3 : 0.5·1 = 0.75 : 0.25; smoothing c = 0.1: 0.9·0.75 + 0.05, 0.9·0.25 + 0.05
    assert doremi_update({"a": 0.5, "b": 0.5}, {"a": math.log(3), "b": 0.0}, 1.0, 0.0) == pytest.approx(
        {"a": 0.75, "b": 0.25}
    )
    assert doremi_update({"a": 0.5, "b": 0.5}, {"a": math.log(3), "b": 0.0}, 1.0, 0.1) == pytest.approx(
        {"a": 0.725, "b": 0.275}
    )
    # η = 2: 0.2 e^2 = 1.4778112, 0.3, 0.5 e = 1.3591409, over their sum 3.1369521; then c = 1e-3
    got = doremi_update({"a": 0.2, "b": 0.3, "c": 0.5}, {"a": 1.0, "b": 0.0, "c": 0.5}, 2.0, 1e-3)
    assert got == pytest.approx({"a": 0.999 * 0.4710978 + 1e-3 / 3, "b": 0.999 * 0.0956342 + 1e-3 / 3,
                                 "c": 0.999 * 0.4332680 + 1e-3 / 3}, rel=1e-6)  # fmt: skip
    # no excess, no smoothing: the weights stay; a huge η λ does not overflow
    assert doremi_update({"a": 0.3, "b": 0.7}, {"a": 0.0, "b": 0.0}, 1.0, 0.0) == pytest.approx({"a": 0.3, "b": 0.7})
    assert doremi_update({"a": 0.5, "b": 0.5}, {"a": 1e4, "b": 0.0}, 1.0, 0.0) == pytest.approx({"a": 1.0, "b": 0.0})
    assert clipped_excess({"a": 3.0, "b": 2.0}, {"a": 2.5, "b": 2.4}) == pytest.approx({"a": 0.5, "b": 0.0})
    assert average_weights([{"a": 0.6, "b": 0.4}, {"a": 0.8, "b": 0.2}]) == pytest.approx({"a": 0.7, "b": 0.3})


@pytest.mark.parametrize("call, needle", [
    (lambda: doremi_update({"a": 1.0}, {"a": 0.0}, -1.0, 0.0), "eta"),
    (lambda: doremi_update({"a": 1.0}, {"a": 0.0}, 1.0, 2.0), r"smoothing c must be in \[0, 1\], got 2.0"),
    (lambda: doremi_update({"a": 1.0}, {"b": 0.0}, 1.0, 0.0), "different domains"),
    (lambda: clipped_excess({"a": 1.0}, {"a": 1.0, "b": 1.0}), "no proxy validation loss for domain 'b'"),
])  # fmt: skip
def test_bad_settings_are_one_line_errors(call, needle):
    with pytest.raises(DoReMiError, match=needle):
        call()


def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    d = build_domain_data(tmp_path)
    base = ["doremi", "--domain", f"code={d['code_train']}", "--domain", f"noise={d['noise_train']}",
            "--valid", f"code={d['code_valid']}", "--run-dir", str(tmp_path / "run")]  # fmt: skip
    assert main(base) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --valid names ['code'] differ from the --domain names ['code', 'noise']"
    ]
    assert main([*base, "--valid", f"noise={d['noise_valid']}", "--", "--train.steps", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: trainer flag --train.steps is set by the DoReMi procedure; leave it out"


def test_doremi_moves_weight_off_the_random_domain(tmp_path, engine_cache):
    d = build_domain_data(tmp_path)
    domains = {"code": (d["code_train"], d["code_valid"]), "noise": (d["noise_train"], d["noise_valid"])}
    lines = []
    in_process = lambda argv: train(load_config(argv))  # noqa: E731 - no interpreter start-up per run
    res = run_doremi(domains, TINY, tmp_path / "run", 2, 5, eta=1.0, trainer=in_process, log=lines.append)
    assert res.reference_losses["code"] < res.reference_losses["noise"]  # the reference learned code, not noise
    assert [r.trained_on for r in res.rounds] == [res.baseline, res.rounds[0].weights] == [
        {"code": 0.5, "noise": 0.5}, res.rounds[0].weights]  # fmt: skip
    first = res.rounds[0]
    assert first.excess["code"] > first.excess["noise"] >= 0  # the proxy lags the reference on code
    assert res.weights == pytest.approx(average_weights([r.weights for r in res.rounds]))
    assert res.weights["code"] > 0.55 > 0.45 > res.weights["noise"]  # 0.618 when written
    assert parse_blend(res.blend) == [(pytest.approx(res.weights["code"], abs=1e-6), d["code_train"]),
                                      (pytest.approx(res.weights["noise"], abs=1e-6), d["noise_train"])]  # fmt: skip
    assert len(lines) == 3 and lines[0].startswith("reference (10 steps)")
    json.dumps(res.weights)  # plain numbers
    with pytest.raises(DoReMiError, match="is not empty"):
        run_doremi(domains, TINY, tmp_path / "run", rounds=1, steps_per_round=1)


def test_cli_prints_the_blend_and_writes_the_rounds(tmp_path, capsys, monkeypatch):
    """`python -m engine.data.curate doremi` end to end, its runs in process (the child-process trainer is tested
    below): 2 rounds of 2 steps against a 6-step reference; stdout is the blend alone, --output every round."""
    in_process = lambda argv: train(load_config(argv))  # noqa: E731
    monkeypatch.setattr(doremi, "subprocess_trainer", lambda launcher: in_process)
    d = build_domain_data(tmp_path)
    args = ["doremi", "--domain", f"code={d['code_train']}", "--domain", f"noise={d['noise_train']}",
            "--valid", f"code={d['code_valid']}", "--valid", f"noise={d['noise_valid']}", "--run-dir",
            str(tmp_path / "run"), "--rounds", "2", "--steps-per-round", "2", "--reference-steps", "6",
            "--output", str(tmp_path / "w.json"), "--", *TINY]  # fmt: skip
    assert main(args) == 0
    blend = capsys.readouterr().out.strip()
    saved = json.loads((tmp_path / "w.json").read_text())
    assert saved["blend"] == blend and len(saved["rounds"]) == 2
    assert saved["weights"] == pytest.approx(average_weights([r["weights"] for r in saved["rounds"]]))
    assert [p for _, p in parse_blend(blend)] == [d["code_train"], d["noise_train"]]
    assert saved["weights"]["code"] > saved["weights"]["noise"]


def test_child_process_trainer_runs_the_launcher_and_keeps_stdout_clean(capsys):
    echo = subprocess_trainer(shlex.join([sys.executable, "-c", "import sys; print('ran', *sys.argv[1:])"]))
    echo(["--train.steps", "3"])
    out, err = capsys.readouterr()
    assert out == "" and err == "ran -m engine.train --train.steps 3\n"  # the trainer's stdout goes to stderr
    with pytest.raises(DoReMiError, match=r"the trainer exited with status 3 \(its error is printed above\)"):
        subprocess_trainer(shlex.join([sys.executable, "-c", "raise SystemExit(3)"]))(["--x", "1"])
