"""The metrics logger on its own: JSONL records, crash cleanup on resume, MFU arithmetic."""

import pytest
import torch

from engine.metrics import (
    SUPERSEDED_NAME,
    MetricsLogger,
    drop_records_after,
    memory_gb,
    model_flops_utilization,
    peak_flops,
    read_metrics,
)


def test_resume_drops_a_crashed_runs_later_records(tmp_path):
    log = MetricsLogger(tmp_path, start_step=0, total_steps=4, progress=False, console=False, tensorboard=False)
    for step in range(5):
        log.log({"step": step, "loss": float("nan") if step == 0 else 1.0 / (step + 1), "lr": torch.tensor(0.5)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # torn by a crash
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4] and recs[0]["loss"] is None and recs[1]["lr"] == 0.5
    log = MetricsLogger(tmp_path, start_step=2, total_steps=4, progress=False, console=False, tensorboard=False)
    log.log({"step": 3, "loss": 9.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")][2:] == [(2, 1 / 3), (3, 9.0)]
    # A fresh start redoes every step, the step-0 evaluation included; the replaced records are kept aside, in order.
    assert drop_records_after(tmp_path / "metrics.jsonl", -1) == 4
    assert read_metrics(tmp_path / "metrics.jsonl") == []
    superseded = read_metrics(tmp_path / SUPERSEDED_NAME)
    assert [(r["step"], r["loss"]) for r in superseded] == [
        (3, 0.25),
        (4, 0.2),
        (0, None),
        (1, 0.5),
        (2, 1 / 3),
        (3, 9.0),
    ]
    assert '{"step": 5, "lo' in (tmp_path / SUPERSEDED_NAME).read_text().splitlines()  # the torn line, kept aside


def test_mfu_and_memory():
    assert peak_flops(torch.device("cpu")) is None
    assert model_flops_utilization(1000.0, 6e9, None, 1) is None
    assert model_flops_utilization(1e5, 6e9, 989e12, 2) == pytest.approx(1e5 * 6e9 / (2 * 989e12))
    assert memory_gb(torch.device("cpu")) > 0
