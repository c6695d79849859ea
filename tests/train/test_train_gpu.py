"""fp16 training end to end on a CUDA device, through the CLI entry `engine.train.main` and the run's metrics.jsonl.

fp16 runs autocast over fp32 master weights with torch's GradScaler, whose initial scale is 65536: the loss is
multiplied by it before backward, so every fused loss kernel sees grad_output = 65536 (inf if narrowed to fp16) and
the mean's per-token gradient far below fp16's subnormals unless the kernel keeps it in range. A tiny model's
gradients are far from fp16's limits, so a correct run never overflows: no step is skipped and the scale stays at
65536 (GradScaler only grows it after 2000 clean steps). A kernel that overflowed would show as skipped steps and a
halved scale. Marked gpu: skipped without CUDA.
"""

import json
import math

import pytest

from engine.train import main
from tests.train.conftest import tiny_args

pytestmark = pytest.mark.gpu

STEPS = 12
INITIAL_SCALE = 65536.0


def _fp16_run(run_dir, data, kernels: str) -> list[dict]:
    args = tiny_args(
        run_dir,
        *data,
        train__dtype="fp16",
        train__device="cuda",
        model__kernels=kernels,
        train__steps=STEPS,
        optim__decay_steps=STEPS,
        eval__every=STEPS // 2,
        checkpoint__every=STEPS,
    )
    assert main(args) == 0
    records = []
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
    return records


def _train_records(records: list[dict]) -> list[dict]:
    steps = [r for r in records if r.get("step", 0) >= 1 and "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    return steps


def _val_losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


@pytest.mark.parametrize("kernels", ["auto", "triton", "torch"])
def test_fp16_training_keeps_the_loss_scale_and_learns(tmp_path, tiny_data, kernels):
    records = _fp16_run(tmp_path / "run", tiny_data, kernels)
    train = _train_records(records)
    losses = [r["loss"] for r in train]
    assert all(math.isfinite(x) for x in losses), losses
    assert all(math.isfinite(r["grad_norm"]) for r in train)
    assert not any(r.get("skipped") for r in train), [r["step"] for r in train if r.get("skipped")]
    scales = [r["loss_scale"] for r in train]
    assert all(s >= INITIAL_SCALE for s in scales), scales
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses  # bytes start near ln(256) = 5.5 and fall fast
    val = _val_losses(records)
    assert 0 in val and STEPS in val and val[STEPS] < val[0] - 0.5, val


def test_fp16_triton_kernels_follow_the_torch_path(tmp_path, tiny_data):
    """The same fp16 run with the Triton kernels and with plain torch (same seed and data): the losses agree to a few
    percent (only the kernels' rounding differs), so the kernels' gradients, scale included, are the torch ones."""
    triton = _train_records(_fp16_run(tmp_path / "triton", tiny_data, "triton"))
    torch_ = _train_records(_fp16_run(tmp_path / "torch", tiny_data, "torch"))
    for a, b in zip(triton, torch_):
        assert abs(a["loss"] - b["loss"]) <= 0.05 * b["loss"], (a["step"], a["loss"], b["loss"])
