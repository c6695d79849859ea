"""python -m engine.evaluation on a trained tiny run: perplexity equal to the trainer's, multiple-choice scoring."""

import json
import math
import re

import pytest
import torch
from torch import nn

from engine.data.tokenizer import ByteTokenizer
from engine.evaluation.__main__ import main
from engine.evaluation.loading import load_run
from engine.evaluation.multiple_choice import Item, few_shot_prefix, read_task, score_task
from engine.evaluation.perplexity import validation_perplexity
from engine.metrics import read_metrics


def _run_json(capsys, *argv) -> dict:
    assert main([*map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _write_task(path, items) -> str:
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return str(path)


def test_perplexity_is_the_trainers_validation_loss(trained_run, tiny_data, capsys):
    run_dir, result = trained_run
    logged = {r["step"]: r["val_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r}
    out = _run_json(capsys, run_dir)
    assert out["step"] == 6
    v = out["validation"]
    assert v["perplexity"] == pytest.approx(math.exp(logged[6]), rel=1e-5, abs=0)
    assert v["loss"] == pytest.approx(result.val_losses[6], rel=1e-6, abs=0)
    assert v["samples"] == 2 * 4 and v["tokens"] == 8 * 32
    # Other data and more batches give other numbers, of the trained (not the initial) model.
    on_train = _run_json(capsys, run_dir, "--data", tiny_data[0])["validation"]
    assert on_train["data"] == tiny_data[0] and on_train["loss"] not in (v["loss"], logged[6])
    assert "validation" not in _run_json(capsys, run_dir, "--no-perplexity")
    more = _run_json(capsys, run_dir, "--batches", 3)["validation"]
    assert more["samples"] == 12 and more["loss"] != v["loss"] and more["loss"] < logged[0]


def test_a_blend_reports_each_component(trained_run, tiny_data, capsys):
    """Held-out data given as a blend: the loss per component (the trainer's val_loss/<name>), the overall loss
    their token-weighted mean, so between them."""
    run_dir = trained_run[0]
    blend = f"1 {tiny_data[1]} 1 {tiny_data[0]}"
    v = _run_json(capsys, run_dir, "--data", blend, "--batches", 2)["validation"]
    names = [p.rsplit("/", 1)[-1] for p in (tiny_data[1], tiny_data[0])]
    assert list(v["components"]) == names and v["data"] == blend
    assert min(v["components"].values()) <= v["loss"] <= max(v["components"].values())
    assert main([str(run_dir), "--data", blend, "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {n}: loss " in out for n in names), out


class ConstantLogits(nn.Module):
    """A language model whose next-token logits are the same at every position: `logits`."""

    def __init__(self, logits: torch.Tensor, seq_len: int = 64):
        super().__init__()
        self.logits, self.cfg = logits, type("Cfg", (), {"seq_len": seq_len})()

    def forward(self, tokens):
        assert tokens.shape[1] <= self.cfg.seq_len, "a window longer than the model's"
        return self.logits.expand(*tokens.shape, -1).clone()


def _items(answer: int) -> list[Item]:
    return [Item(f"question {i}:", ("aaaa", "bbbb"), answer, i + 1) for i in range(4)]


def test_a_forced_answer_scores_all_or_nothing():
    tok = ByteTokenizer()
    logits = torch.zeros(tok.vocab_size)
    logits[ord("a")] = logits[ord(" ")] = 20.0  # the model all but always says "a" (after the delimiter)
    model = ConstantLogits(logits)
    for shots in (0, 2):
        right = score_task(model, tok, _items(0), shots=shots)
        wrong = score_task(model, tok, _items(1), shots=shots)
        assert (right.acc, right.acc_norm, wrong.acc, wrong.acc_norm) == (1.0, 1.0, 0.0, 0.0)
        assert right.acc_stderr == 0.0


def test_acc_norm_divides_by_the_choice_characters():
    """Uniform logits: every byte costs log V, so the short choice wins acc and the long one acc_norm
    ((1 + chars) log V / chars falls with the length; the delimiter's token is not counted in the length)."""
    tok = ByteTokenizer()
    model = ConstantLogits(torch.zeros(tok.vocab_size))
    res = score_task(model, tok, [Item("q", ("ab", "abcdef"), 1, 1)])
    lv = math.log(tok.vocab_size)
    assert res.loglikelihoods[0] == pytest.approx([-3 * lv, -7 * lv])
    assert (res.acc, res.acc_norm) == (0.0, 1.0)


def test_long_requests_keep_their_last_seq_len_tokens():
    tok = ByteTokenizer()
    logits = torch.zeros(tok.vocab_size)
    logits[ord("z")] = 5.0
    model = ConstantLogits(logits, seq_len=8)
    lp = torch.log_softmax(logits, -1)
    res = score_task(model, tok, [Item("x" * 50, ("zz", "yz"), 0, 1)])  # 53 tokens cut to the last 9
    assert res.loglikelihoods[0] == pytest.approx([float(lp[32] + 2 * lp[122]), float(lp[32] + lp[121] + lp[122])])
    with pytest.raises(ValueError, match="longer than the model's seq_len 8"):
        score_task(model, tok, [Item("x", ("z" * 8, "y"), 0, 1)])


def test_loglikelihood_by_hand(trained_run):
    run = load_run(trained_run[0])
    context, choice = "def decode(self, s):", "return s"
    res = score_task(run.model, run.tokenizer, [Item(context, (choice, "pass"), 0, 1)])
    ids = list((context + " " + choice).encode())
    n_cont = len(choice) + 1
    with torch.no_grad():
        logp = torch.log_softmax(run.model(torch.tensor([ids[:-1]])).double(), dim=-1)[0]
    direct = sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n_cont, len(ids)))
    assert res.loglikelihoods[0][0] == pytest.approx(direct, rel=1e-6)


def test_few_shot_examples_are_seeded_and_never_the_scored_line():
    items = [Item(f"c{i}", ("x", "y"), i % 2, i + 1) for i in range(6)]
    for i in range(6):
        prefix = few_shot_prefix(items, i, 5, seed=7)
        assert f"c{i} " not in prefix and all(f"c{j} {'xy'[j % 2]}\n\n" in prefix for j in range(6) if j != i)
        assert prefix == few_shot_prefix(items, i, 5, seed=7)
    draws = {few_shot_prefix(items, 0, 2, seed=s) for s in range(20)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match="6 shots need 7 items"):
        few_shot_prefix(items, 0, 6, seed=7)


def test_tasks_through_the_cli(trained_run, tmp_path, capsys):
    task = _write_task(tmp_path / "t.jsonl", [{"context": "import", "choices": [" json", " zzzz"], "answer": 0}] * 3)
    out = _run_json(capsys, trained_run[0], "--tasks", task, "--shots", 1, "--no-perplexity")
    r = out["tasks"][task]
    assert r["n"] == 3 and r["shots"] == 1 and 0.0 <= r["acc"] <= 1.0 and r["task"] == "t"


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "run directory .* does not exist"),
        ("empty", "holds no complete checkpoint"),
        ("bad_json", r"t.jsonl:2: not valid JSON"),
        ("no_choices", r"t.jsonl:1: missing key 'choices'"),
        ("answer", r"t.jsonl:2: answer 2 is out of range for 2 choices"),
        ("shots", "3 shots need 4 items in the task file, it has 2"),
        ("data", r"held-out data .*nowhere.bin/.idx not found"),
        ("blend", r"held-out data .*nowhere.bin/.idx not found"),
    ],
)
def test_bad_input_is_one_line(case, expected, trained_run, tiny_data, tmp_path, capsys):
    ok = json.dumps({"context": "a", "choices": ["b", "c"], "answer": 0})
    run, extra = trained_run[0], []
    if case == "missing":
        run = tmp_path / "nope"
    elif case == "empty":
        run = tmp_path / "empty"
        run.mkdir()
    elif case == "data":
        extra = ["--data", str(tmp_path / "nowhere")]
    elif case == "blend":  # the valid split exists, the second component does not
        extra = ["--data", f"1 {tiny_data[1]} 1 {tmp_path / 'nowhere'}"]
    else:
        lines = {"bad_json": [ok, "{oops"], "no_choices": ['{"context": "a", "answer": 0}'],
                 "answer": [ok, ok.replace('"answer": 0', '"answer": 2')], "shots": [ok, ok]}[case]  # fmt: skip
        (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
        extra = ["--tasks", str(tmp_path / "t.jsonl"), "--shots", "3"]
    assert main([str(run), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(expected, err), err


def test_read_task_keeps_line_numbers(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('\n{"context": "a", "choices": ["b", "c"], "answer": 1}\n')
    assert read_task(path) == [Item("a", ("b", "c"), 1, 2)]


@pytest.mark.gpu
def test_cuda_matches_cpu_within_bf16(trained_run, capsys):
    """On CUDA the run's precision is bf16 autocast (as the trainer's evaluation there): close to fp32 on CPU."""
    cpu = _run_json(capsys, trained_run[0], "--device", "cpu")["validation"]["loss"]
    cuda = _run_json(capsys, trained_run[0], "--device", "cuda")["validation"]["loss"]
    assert cuda == pytest.approx(cpu, rel=2e-2)


def test_a_run_without_held_out_data_needs_data(trained_run):
    run = load_run(trained_run[0])
    run.cfg.data.valid_path = ""
    with pytest.raises(ValueError, match="the run has no data.valid_path; give held-out data with --data PREFIX"):
        validation_perplexity(run)
    with pytest.raises(ValueError, match="--batches must be >= 1, got 0"):
        validation_perplexity(run, batches=0)


def test_python_m_engine_evaluate_is_the_same_command(trained_run, tmp_path):
    """`python -m engine.evaluate RUN_DIR` (the issue's name, next to engine.train) runs engine.evaluation's main."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    task = _write_task(tmp_path / "t.jsonl", [{"context": "import", "choices": [" json", " zzzz"], "answer": 0}] * 3)
    cmd = [sys.executable, "-m", "engine.evaluate", str(trained_run[0]), "--tasks", task, "--no-perplexity", "--json"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["tasks"][task]["n"] == 3


def test_a_multi_token_prediction_run_evaluates_as_its_next_token_model(tmp_path, tiny_data, capsys):
    """An mtp checkpoint loads without its extra modules (`mtp.*`); the trainer's validation loss is the next-token
    loss, so the perplexity is that loss."""
    from engine.config import load_config
    from engine.train import train
    from tests.train.conftest import tiny_args

    run_dir = tmp_path / "mtp"
    result = train(load_config(tiny_args(run_dir, *tiny_data, train__objective="mtp", objective__mtp_depth=2)))
    v = _run_json(capsys, run_dir)["validation"]
    assert v["loss"] == pytest.approx(result.val_losses[6], rel=1e-6, abs=0)
