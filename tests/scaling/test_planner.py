"""engine.scaling.planner: the budget arithmetic, one row per law with 6 N D = C, shapes near N, the TOML the
trainer takes (read back and dry-run in-process), --json, and one-line errors (exit 2)."""

import json
import math

import pytest

from engine.config import ModelConfig, load_config
from engine.model.gpt import count_params, flops_per_token, resolve
from engine.scaling import LAWS, PlanError, model_config_near, plan, plan_config
from engine.scaling.__main__ import main as scaling_main
from engine.scaling.planner import cli_main
from engine.train import main as train_main


def test_rows_use_the_budget_and_bigger_clusters_get_bigger_models():
    rows = plan(flops=1e21)
    assert [r.law for r in rows] == list(LAWS)
    for r in rows:
        assert 6 * r.n_params * r.tokens == pytest.approx(1e21, rel=1e-12)
        assert r.tokens_per_param == pytest.approx(r.tokens / r.n_params)
        assert r.model_params == pytest.approx(r.n_params, rel=0.05)
        assert r.days is None
        # GPU-days: the model's FLOPs per token x D / (989e12 x 0.4) / 86400
        assert r.gpu_days == pytest.approx(flops_per_token(r.model) * r.tokens / (989e12 * 0.4 * 86400))
    by_law = {r.law: r for r in rows}
    assert by_law["kaplan"].n_kind == "non-embedding" and by_law["chinchilla-3"].n_kind == "total"
    assert by_law["kaplan"].model_params == count_params(by_law["kaplan"].model, non_embedding=True)
    assert by_law["chinchilla-1"].loss is None and by_law["chinchilla-3"].loss == pytest.approx(2.2955, abs=1e-3)
    assert round(by_law["kaplan"].n_params / 1e9, 2) == 4.68
    # about 29.3 GPU-days of budget (1e21 / (989e12 x 0.4) / 86400); attention and the logits add a few percent
    assert 1.0 < by_law["chinchilla-1"].gpu_days / (1e21 / (989e12 * 0.4 * 86400)) < 1.15

    # 64 H100 for 7 days at MFU 0.45: 64 x 7 x 86400 x 989e12 x 0.45 = 1.7227e22 FLOPs
    small, big = plan(gpus=64, days=7, mfu=0.45), plan(gpus=128, days=7, mfu=0.45)
    assert small[0].flops == pytest.approx(1.7227e22, rel=1e-4) and big[0].flops == 2 * small[0].flops
    for a, b in zip(small, big):
        assert b.n_params > a.n_params and b.model_params > a.model_params
        assert a.days == pytest.approx(7, rel=0.2) and b.days == pytest.approx(7, rel=0.2)
    assert plan(flops=1e21, gpus=8)[1].days == pytest.approx(rows[1].gpu_days / 8)


def test_model_config_near():
    for n in (2e7, 1.2e8, 2.85e9, 7e9, 70e9):
        cfg = model_config_near(n)
        assert cfg.arch == "llama" and cfg.vocab_size == 32000 and not cfg.tie_embeddings
        assert cfg.d_model % cfg.n_heads == 0 and cfg.d_model // cfg.n_heads in (64, 128)
        assert count_params(cfg) == pytest.approx(n, rel=0.05)
        assert 40 < cfg.d_model / cfg.n_layers < 250  # aspect ratio near 100 (small models are coarser)
    # the rule by brute force at 2e7: of all shapes within 5%, the one with d_model / n_layers nearest 100
    within = []
    for layers in range(1, 17):
        for d in range(64, 1025, 64):
            shape = ModelConfig(n_layers=layers, d_model=d, n_heads=d // 64, vocab_size=32000, tie_embeddings=False)
            n = count_params(resolve(shape))
            if abs(math.log(n / 2e7)) <= math.log(1.05):
                within.append((abs(math.log(d / layers / 100)), layers, d))
    cfg = model_config_near(2e7)
    assert min(within)[1:] == (cfg.n_layers, cfg.d_model) == (4, 256)
    cfg = model_config_near(7e9, vocab_size=50304, seq_len=4096, non_embedding=True)
    assert count_params(cfg, non_embedding=True) == pytest.approx(7e9, rel=0.05) and cfg.vocab_size == 50304
    assert cfg.seq_len == 4096
    with pytest.raises(PlanError, match="within 25%"):
        model_config_near(1e6)  # a 32k vocabulary alone is 4M parameters at d_model 64
    with pytest.raises(PlanError, match="positive"):
        model_config_near(-1)


def test_toml_round_trip_and_dry_run(tmp_path, capsys):
    out = tmp_path / "plan.toml"
    assert cli_main(["--flops", "1e21", "--toml", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "chinchilla-1" in printed and f"wrote {out}" in printed
    row = next(r for r in plan(flops=1e21) if r.law == "chinchilla-1")
    cfg = load_config(["--config", str(out)])
    assert cfg == plan_config(row) and cfg.model == row.model
    assert cfg.model.n_layers == 28 and cfg.model.d_model == 2816
    # 2^20 tokens a step: 512 sequences of 2048; steps = ceil(5.7975e10 / 1,048,576) = ceil(55,289.5) = 55,290
    assert cfg.train.global_batch == 512 and cfg.train.steps == math.ceil(row.tokens / 2**20) == 55_290
    # the trainer's dry run takes it (built on the meta device: cheap at any size)
    assert train_main(["--config", str(out), "--train.dry_run", "true"]) == 0
    dry = capsys.readouterr().out
    assert f"{count_params(row.model):,} parameters" in dry
    # an existing file is replaced only with --force
    written = out.read_text()
    out.write_text("my config")
    assert cli_main(["--flops", "1e21", "--toml", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --toml {out} exists; pass --force to replace it"
    assert out.read_text() == "my config"
    assert cli_main(["--flops", "1e21", "--toml", str(out), "--force"]) == 0 and out.read_text() == written


def test_json_and_the_module_entry_point(capsys):
    assert cli_main(["--gpus", "64", "--days", "7", "--mfu", "0.45", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpus"] == 64 and data["flops"] == pytest.approx(1.7227e22, rel=1e-4)
    assert [r["law"] for r in data["rows"]] == list(LAWS)
    assert all(r["days"] == pytest.approx(7, rel=0.2) and r["model"]["n_layers"] > 0 for r in data["rows"])
    assert scaling_main(["plan", "--flops", "5.76e23"]) == 0  # `python -m engine.scaling plan ...`, in-process
    table = capsys.readouterr().out
    assert "chinchilla-1" in table and "69B" in table and "GPU-days" in table


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give a budget"),
        (["--gpus", "8"], "give a budget"),
        (["--flops", "-1"], "--flops must be a positive number"),
        (["--flops", "abc"], "invalid float value"),
        (["--flops", "1e21", "--device", "tpu"], "unknown device 'tpu'"),
        (["--flops", "1e21", "--mfu", "2"], "--mfu must be in (0, 1]"),
        (["--flops", "1e21", "--gpus", "8", "--days", "3"], "not both"),
        (["--gpus", "0", "--days", "3"], "--gpus must be >= 1"),
        (["--flops", "1e21", "--law", "gpt4"], "--law must be one of"),
        (["--flops", "1e21", "--bogus"], "unrecognized arguments"),
        (["--flops", "1e10"], "within 25%"),
        (["--flops", "1e21", "--toml", "/nonexistent/dir/x.toml"], "cannot write"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
