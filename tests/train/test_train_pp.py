"""The training loop under pipeline parallelism (`--parallel.pp`), composed with dp and tp, run through the user's
entry point (examples/pretrain_gpt.py) for 6 steps: the one-process losses and gradient norms to 1e-5 (metrics.jsonl,
what a user reads), validation losses too, every rank's losses the same, and a bit-identical resume under pp 2.

Micro-batch counts 1, 4 and 8 come from a global batch of 8 at train.micro_batch 8, 2 and 1. The full matrix (every
schedule at every count, pp 2 and pp 4) is marked slow; the quick tests take one count per schedule."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.metrics import read_metrics
from tests.distributed import free_port, run_distributed
from tests.train.conftest import tiny_args

ROOT = Path(__file__).resolve().parents[2]
STEPS, HALF = 6, 3  # runs stop at HALF and resume to STEPS; evaluations and checkpoints every HALF steps
# Two micro-batches per step by default: accumulation stays covered, and the per-micro-batch collectives (the cost of
# a tp/cp run on 2 cores) stay few. Tests of schedules set their micro-batch counts explicitly.
BASE = dict(model__n_layers=4, train__steps=STEPS, optim__decay_steps=STEPS, eval__every=HALF, eval__batches=1,
            checkpoint__every=HALF, train__global_batch=8, train__micro_batch=4, optim__clip=0.5)  # fmt: skip
MICRO = {1: 8, 4: 2, 8: 1}  # micro-batches per step -> train.micro_batch


def _entry():
    """`main` of examples/pretrain_gpt.py, loaded from its file as `torchrun ... examples/pretrain_gpt.py` runs it."""
    spec = importlib.util.spec_from_file_location("pretrain_gpt", ROOT / "examples" / "pretrain_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _metrics(run_dir) -> tuple[dict, dict, dict]:
    """(losses, grad norms, val losses) by step, as the run logged them in metrics.jsonl."""
    recs = read_metrics(Path(run_dir) / "metrics.jsonl")
    losses = {r["step"]: r["loss"] for r in recs if r.get("loss") is not None}
    norms = {r["step"]: r["grad_norm"] for r in recs if r.get("grad_norm") is not None}
    vals = {r["step"]: r["val_loss"] for r in recs if r.get("val_loss") is not None}
    return losses, norms, vals


def _run(run_dir, data, **kw):
    """One run through the example's entry (in a spawned rank: inside the test's process group); returns what
    metrics.jsonl holds once every rank is done (rank 0 writes it)."""
    assert _entry()(tiny_args(run_dir, *data, **{**BASE, **kw})) == 0
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    return _metrics(run_dir)


def _close(got, ref, what, rtol=1e-5):
    """Two runs' values by step (losses, gradient norms, ...), the same steps, each within `rtol`."""
    assert set(got) == set(ref), f"{what}: steps {sorted(got)} vs {sorted(ref)}"
    for key in ref:
        assert abs(got[key] - ref[key]) <= rtol * abs(ref[key]), f"{what} at {key}: {got} vs {ref}"


def _check(results, refs, n_metrics=3):
    """Every layout of every rank equals its one-process reference (keyed by the layout's n_layers and arch)."""
    for r in results:
        for label, (ref_key, runs) in r.items():
            for got, want, what in zip(runs[:n_metrics], refs[ref_key][:n_metrics], ("losses", "grad norms", "val")):
                _close(got, want, f"{label} {what}")
    assert all(r == results[0] for r in results[1:])  # the logged metrics are the same file's, as every rank saw it


PP2 = {  # label: (one-process reference, flags)
    "pp2 1f1b m4": ("llama4", dict(train__micro_batch=MICRO[4])),
    "pp2 gpipe m1": ("llama4", dict(parallel__pp_schedule="gpipe", train__micro_batch=MICRO[1])),
    "pp2 zb m8": ("llama4", dict(parallel__pp_schedule="zb", train__micro_batch=MICRO[8])),
    "pp2 interleaved m4": (
        "llama4",
        dict(parallel__pp_schedule="interleaved", parallel__virtual_stages=2, train__micro_batch=MICRO[4]),
    ),
    "pp2 gpt2 tied": ("gpt2", dict(model__arch="gpt2")),
}


def _pp2_worker(rank, world, root, data):
    root = Path(root)
    out = {k: (ref, _run(root / f"r{i}", data, parallel__pp=2, **kw)) for i, (k, (ref, kw)) in enumerate(PP2.items())}
    # Stop at step HALF, resume to STEPS: bit-identical to the straight run of the same layout ("pp2 1f1b m4").
    _run(root / "split", data, parallel__pp=2, train__micro_batch=MICRO[4], train__steps=HALF)
    out["resumed"] = _run(root / "split", data, parallel__pp=2, train__micro_batch=MICRO[4])
    return out


def _refs(root, data, keys):
    kws = {"llama4": {}, "llama8": dict(model__n_layers=8), "gpt2": dict(model__arch="gpt2")}
    return {k: _run(Path(root) / f"one_{k}", data, **kws[k]) for k in keys}


@pytest.mark.distributed
def test_pipeline_trains_like_one_process_and_resumes_exactly(tmp_path, tiny_data):
    results = run_distributed(_pp2_worker, 2, str(tmp_path), tiny_data, timeout=300)
    refs = _refs(tmp_path, tiny_data, ("llama4", "gpt2"))
    for r in results:
        resumed, straight = r.pop("resumed"), r["pp2 1f1b m4"][1]
        assert resumed[0] == straight[0]  # bit-identical after the resume
        assert resumed[1] == straight[1]
    _check(results, refs)


PP2_4RANKS = {
    "pp2 x dp2 interleaved": dict(parallel__pp=2, parallel__virtual_stages=2, parallel__pp_schedule="interleaved",
                                   train__micro_batch=2),
    "pp2 x tp2": dict(parallel__pp=2, parallel__tp=2),
    "pp2 x tp2 sp": dict(parallel__pp=2, parallel__tp=2, parallel__sp="true"),
}


def _pp_4rank_worker(rank, world, root, data):
    return {k: ("llama4", _run(Path(root) / f"r{i}", data, **kw)) for i, (k, kw) in enumerate(PP2_4RANKS.items())}


@pytest.mark.distributed
def test_pipeline_with_dp_and_tp(tmp_path, tiny_data):
    results = run_distributed(_pp_4rank_worker, 4, str(tmp_path), tiny_data, timeout=300)
    _check(results, _refs(tmp_path, tiny_data, ("llama4",)))


def _matrix_worker(rank, world, root, data):
    """Every schedule at 1, 4 and 8 micro-batches; interleaved (2 chunks a rank, 8 layers) at 4 and 8."""
    root, pp = Path(root), world
    out = {}
    for schedule in ("gpipe", "1f1b", "zb"):
        for m, micro in MICRO.items():
            kw = dict(parallel__pp=pp, parallel__pp_schedule=schedule, train__micro_batch=micro, **MATRIX)
            out[f"pp{pp} {schedule} m{m}"] = ("llama4", _run(root / f"{schedule}{m}", data, **kw))
    for m in (4, 8):
        kw = dict(parallel__pp=pp, parallel__virtual_stages=2, parallel__pp_schedule="interleaved",
                  model__n_layers=8, train__micro_batch=MICRO[m], **MATRIX)  # fmt: skip
        out[f"pp{pp} interleaved m{m}"] = ("llama8", _run(root / f"int{m}", data, **kw))
    return out


MATRIX = dict(eval__every=0, checkpoint__every=0)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("pp", [2, 4])
def test_pipeline_layout_matrix(pp, tmp_path, tiny_data):
    """pp 2 and pp 4, every schedule at 1, 4 and 8 micro-batches (interleaved at 4 and 8 with 2 chunks per rank over
    8 layers), equal one process to 1e-5 (losses and gradient norms)."""
    results = run_distributed(_matrix_worker, pp, str(tmp_path), tiny_data, timeout=900)
    refs = {k: _run(tmp_path / f"one_{k}", tiny_data, **MATRIX, **kw)
            for k, kw in (("llama4", {}), ("llama8", dict(model__n_layers=8)))}  # fmt: skip
    assert all(len(r) == 11 for r in results)
    _check(results, refs, n_metrics=2)


@pytest.mark.distributed
def test_torchrun_launch_of_the_example(tmp_path, tiny_data):
    """The user's command, `torchrun --nproc-per-node 2 examples/pretrain_gpt.py --parallel.pp 2 ...`, logs the
    one-process losses (a real launcher: its environment, its rendezvous, the script's own process group)."""
    pp_dir, one_dir = tmp_path / "pp2", tmp_path / "one"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "examples/pretrain_gpt.py", *tiny_args(pp_dir, *tiny_data, **{**BASE, "parallel__pp": 2,
                                                                          "parallel__pp_schedule": "zb"})]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = _run(one_dir, tiny_data)
    for got, want, what in zip(_metrics(pp_dir), ref, ("losses", "grad norms", "val losses")):
        _close(got, want, f"torchrun pp 2 zb {what}")
