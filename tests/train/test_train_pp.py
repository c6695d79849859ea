"""The training loop under pipeline parallelism (`--parallel.pp`), composed with dp and tp: the one-process losses,
gradient norms and validation losses to 1e-5, and a bit-identical resume under pp 2."""

import pytest

from engine.config import load_config
from engine.train import train
from tests.distributed import run_distributed
from tests.train.conftest import tiny_args

BASE = dict(model__n_layers=4, train__steps=6, optim__decay_steps=6, eval__every=3, eval__batches=1,
            checkpoint__every=3, train__global_batch=4, train__micro_batch=1, optim__clip=0.5)  # fmt: skip


def _run(run_dir, data, **kw):
    res = train(load_config(tiny_args(run_dir, *data, **{**BASE, **kw})))
    return res.losses, res.grad_norms, res.val_losses


def _close(got, ref, what):
    for key in ref:
        assert abs(got[key] - ref[key]) <= 1e-5 * abs(ref[key]), f"{what} at {key}: {got} vs {ref}"


def _pp2_worker(rank, world, root, data):
    from pathlib import Path

    root = Path(root)
    out = {s: _run(root / s, data, parallel__pp=2, parallel__pp_schedule=s) for s in ("1f1b", "gpipe", "zb")}
    # 3 steps, stop, resume to 6: bit-identical to the straight 1f1b run (same layout)
    _run(root / "split", data, parallel__pp=2, train__steps=3)
    out["resumed"] = _run(root / "split", data, parallel__pp=2)
    return out


@pytest.mark.distributed
def test_pipeline_trains_like_one_process_and_resumes_exactly(tmp_path, tiny_data):
    results = run_distributed(_pp2_worker, 2, str(tmp_path), tiny_data, timeout=240)
    ref = _run(tmp_path / "one", tiny_data)
    for r in results:
        for schedule in ("1f1b", "gpipe", "zb"):
            for got, want, what in zip(r[schedule], ref, ("losses", "grad norms", "val losses")):
                _close(got, want, f"pp 2 {schedule} {what}")
        resumed, straight = r["resumed"], r["1f1b"]
        assert [resumed[0][s] for s in (4, 5, 6)] == [straight[0][s] for s in (4, 5, 6)]
    assert results[0] == results[1]  # every rank logs the same losses


def _pp_4rank_worker(rank, world, root, data):
    from pathlib import Path

    root = Path(root)
    return {
        "pp2xdp2 interleaved": _run(root / "a", data, parallel__pp=2, parallel__pp_schedule="interleaved",
                                    parallel__virtual_stages=2, train__micro_batch=1),  # fmt: skip
        "pp2xtp2 sp": _run(root / "b", data, parallel__pp=2, parallel__tp=2, parallel__sp="true"),
    }


@pytest.mark.distributed
def test_pipeline_with_dp_and_tp(tmp_path, tiny_data):
    results = run_distributed(_pp_4rank_worker, 4, str(tmp_path), tiny_data, timeout=240)
    ref = _run(tmp_path / "one", tiny_data)
    for r in results:
        for label, runs in r.items():
            for got, want, what in zip(runs, ref, ("losses", "grad norms", "val losses")):
                _close(got, want, f"{label} {what}")


def _pp4_matrix_worker(rank, world, root, data):
    from pathlib import Path

    root = Path(root)
    out = {}
    for schedule in ("gpipe", "1f1b", "zb"):
        for micro in (8, 2, 1):  # 1, 4 and 8 micro-batches of the global batch of 8
            kw = dict(parallel__pp=4, parallel__pp_schedule=schedule, train__micro_batch=micro, **MATRIX)
            out[(schedule, micro)] = _run(root / f"{schedule}{micro}", data, **kw)
    for micro in (2, 1):  # interleaved needs micro-batches divisible by pp: 4 and 8
        out[("interleaved", micro)] = _run(root / f"int{micro}", data, parallel__pp=4, parallel__virtual_stages=2,
                                           parallel__pp_schedule="interleaved", model__n_layers=8,
                                           train__micro_batch=micro, **MATRIX)  # fmt: skip
    return out


MATRIX = dict(train__global_batch=8, eval__every=0, checkpoint__every=0)


@pytest.mark.slow
@pytest.mark.distributed
def test_pipeline_layout_matrix_pp4(tmp_path, tiny_data):
    """pp 4 with every schedule at 1, 4 and 8 micro-batches (interleaved at 4 and 8 with 2 chunks per rank over 8
    layers) equals one process to 1e-5 (losses and gradient norms)."""
    results = run_distributed(_pp4_matrix_worker, 4, str(tmp_path), tiny_data, timeout=600)
    refs = {4: _run(tmp_path / "one4", tiny_data, **MATRIX), 8: _run(tmp_path / "one8", tiny_data,
                                                                        model__n_layers=8, **MATRIX)}  # fmt: skip
    for r in results:
        assert len(r) == 11
        for (schedule, micro), runs in r.items():
            ref = refs[8 if schedule == "interleaved" else 4]
            for got, want, what in zip(runs[:2], ref[:2], ("losses", "grad norms")):
                _close(got, want, f"pp 4 {schedule} micro {micro} {what}")
