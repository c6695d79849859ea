"""`--train.fp8 delayed|current` on CPU (emulated through torch's float8 dtypes): a 4-layer model (its middle two layers
in FP8) trains 30 steps to within 5% of the fp32 loss without equalling it, and a delayed-scaling run resumed at step 15
is bit-identical to the straight one (the amax histories travel in the checkpoint)."""

from engine.metrics import read_metrics
from engine.train import main
from tests.train.conftest import tiny_args

STEPS = dict(model__n_layers=4, train__steps=30, optim__decay_steps=30, eval__every=15, checkpoint__every=15)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("loss") is not None}


def test_fp8_trains_close_to_fp32_and_resumes_exactly(tmp_path, tiny_data):
    runs = {}
    for name, kw in (("fp32", {}), ("delayed", dict(train__fp8="delayed")), ("current", dict(train__fp8="current"))):
        assert main(tiny_args(tmp_path / name, *tiny_data, **STEPS, **kw)) == 0
        runs[name] = _losses(tmp_path / name)
    for name in ("delayed", "current"):
        assert runs[name] != runs["fp32"], name  # fp8 really applied
        last, ref = runs[name][30], runs["fp32"][30]
        assert abs(last - ref) <= 0.05 * ref, (name, last, ref)
    split = tmp_path / "split"
    assert main(tiny_args(split, *tiny_data, **{**STEPS, "train__steps": 15}, train__fp8="delayed")) == 0
    assert main(tiny_args(split, *tiny_data, **STEPS, train__fp8="delayed")) == 0
    assert _losses(split) == runs["delayed"]  # bit-identical after the resume
