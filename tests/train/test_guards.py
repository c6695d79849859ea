"""The training loop's guards, by injecting the fault for real: a NaN (skip / rollback / stop), SIGTERM, a second
job on a run directory in use, and async checkpoints (the same files as sync ones, resumed bit-identically)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.checkpoint.checkpointer import latest_checkpoint
from engine.checkpoint.reader import load_checkpoint
from engine.config import load_config
from engine.metrics import SUPERSEDED_NAME, read_metrics
from engine.train import _Run, main, train
from tests.distributed import run_distributed
from tests.train.conftest import tiny_args
from tests.train.test_train import _nan_loss_at

ROOT = Path(__file__).resolve().parents[2]
BASE = dict(eval__every=0, checkpoint__every=2)


def _train(run_dir, data, **kw):
    return train(load_config(tiny_args(run_dir, *data, **{**BASE, **kw})))


def _records(run_dir):
    return {r["step"]: r for r in read_metrics(Path(run_dir) / "metrics.jsonl")}


def test_on_nan_rollback_restores_the_last_checkpoint_and_skips_the_batch(tmp_path, tiny_data, monkeypatch):
    straight = _train(tmp_path / "straight", tiny_data)
    _nan_loss_at(monkeypatch, {4})  # the 4th training forward: step 4's only micro-batch
    res = _train(tmp_path / "rollback", tiny_data, resilience__on_nan="rollback")
    assert res.rollbacks == [4] and res.skipped_steps == [] and res.end_step == 6
    recs = _records(tmp_path / "rollback")
    assert sorted(recs) == [1, 2, 3, 4, 5, 6]  # one timeline: the rolled-back steps 3 and 4 moved aside
    assert [r["step"] for r in read_metrics(tmp_path / "rollback" / SUPERSEDED_NAME)] == [3, 4]
    # Redone from the step-2 checkpoint, step 3 is the straight run's bit for bit; step 4 then takes the next batch.
    assert [recs[s]["loss"] for s in (1, 2, 3)] == [straight.losses[s] for s in (1, 2, 3)]
    assert recs[6]["consumed_samples"] == 7 * 4 and recs[6]["rollbacks"] == 1
    assert all(torch.isfinite(torch.tensor(recs[s]["loss"])) for s in (4, 5, 6))


def test_on_nan_stop_ends_the_run_at_the_bad_step(tmp_path, tiny_data, monkeypatch, capsys):
    _nan_loss_at(monkeypatch, {3})
    assert main(tiny_args(tmp_path / "stop", *tiny_data, **BASE, resilience__on_nan="stop")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: step 3 had a non-finite gradient norm") and "on_nan is stop" in err[-1]
    assert latest_checkpoint(tmp_path / "stop" / "checkpoints").name == "step_00000002"


def _sigterm_at(monkeypatch, step, rank=None):
    """SIGTERM to this process (on `rank` only, if given) right after training step `step`."""
    real = _Run.train_step

    def wrapped(self):
        out = real(self)
        if self.step == step and (rank is None or self.rank == rank):
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(_Run, "train_step", wrapped)


def test_sigterm_saves_the_current_step_and_the_resume_goes_on_exactly(tmp_path, tiny_data, monkeypatch):
    straight = _train(tmp_path / "straight", tiny_data, checkpoint__every=100)
    _sigterm_at(monkeypatch, 3)
    res = _train(tmp_path / "run", tiny_data, checkpoint__every=100)
    assert res.preempted and res.end_step == 3
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    monkeypatch.undo()
    resumed = _train(tmp_path / "run", tiny_data, checkpoint__every=100)
    assert resumed.start_step == 3 and [resumed.losses[s] for s in (4, 5, 6)] == [straight.losses[s] for s in (4, 5, 6)]


def test_async_checkpoints_hold_what_sync_ones_do(tmp_path, tiny_data, capsys, monkeypatch):
    from engine.checkpoint import checkpointer

    sync = _train(tmp_path / "sync", tiny_data)
    capsys.readouterr()
    real = checkpointer._save_file

    def slow(obj, path):  # a slow disk: the steps after a save run while its files are still being written
        time.sleep(0.2)
        return real(obj, path)

    monkeypatch.setattr(checkpointer, "_save_file", slow)
    res = _train(tmp_path / "async", tiny_data, checkpoint__async="true")
    err = capsys.readouterr().err
    assert res.losses == sync.losses and len(res.checkpoint_stall_s) == 3
    assert "step 2: checkpoint staged in" in err and "checkpoint of step 6 written in" in err
    assert [s for s, r in _records(tmp_path / "async").items() if "checkpoint_stall_s" in r] == [3, 5]
    for step in (4, 6):
        a = load_checkpoint(tmp_path / "async" / "checkpoints" / f"step_{step:08d}")
        b = load_checkpoint(tmp_path / "sync" / "checkpoints" / f"step_{step:08d}")
        for group in ("model", "optim"):
            assert a.tensors[group].keys() == b.tensors[group].keys()
            assert all(torch.equal(a.tensors[group][k], v) for k, v in b.tensors[group].items())
    # The staged copy is the step's state, not a later one: resuming from step 4 redoes 5 and 6 exactly.
    more = _train(tmp_path / "more", tiny_data, resume=str(tmp_path / "async" / "checkpoints" / "step_00000004"))
    assert [more.losses[s] for s in (5, 6)] == [sync.losses[s] for s in (5, 6)]


def _async_sigterm_worker(rank, world, root, data):
    import torch.distributed as dist

    root = Path(root)
    straight = _train(root / "straight", data, checkpoint__async="true", checkpoint__every=100)
    real = _Run.train_step

    def wrapped(self):
        out = real(self)
        if self.step == 3 and self.rank == 1:  # one rank is told to stop: both save step 3 and stop
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    _Run.train_step = wrapped
    stopped = _train(root / "run", data, checkpoint__async="true", checkpoint__every=100)
    _Run.train_step = real
    resumed = _train(root / "run", data, checkpoint__async="true", checkpoint__every=100)
    dist.barrier()
    return straight.losses, stopped.end_step, stopped.preempted, resumed.start_step, resumed.losses


@pytest.mark.distributed
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_with_async_saves(tmp_path, tiny_data):
    out = run_distributed(_async_sigterm_worker, 2, str(tmp_path), tiny_data, timeout=180)
    for straight, end, preempted, start, resumed in out:
        assert (end, preempted, start) == (3, True, 3)
        assert [resumed[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000006"


def test_a_second_job_on_a_run_directory_in_use_is_refused(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [sys.executable, "-m", "engine.train", *tiny_args(run, *tiny_data, train__steps=300, optim__decay_steps=300,
                                                          eval__every=0, checkpoint__every=100)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 60
        while not (run / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        assert main(tiny_args(run, *tiny_data, train__steps=300, optim__decay_steps=300, eval__every=0)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by another job (host {os.uname().nodename}, pid {first.pid}" in err[0]
        assert first.wait(timeout=120) == 0, first.stderr.read()
    finally:
        first.kill()
    assert sorted(_records(run)) == list(range(1, 301))  # the first job's records, whole and alone
    assert latest_checkpoint(run / "checkpoints").name == "step_00000300"


def test_run_guards_count_spikes_and_report_stragglers_into_the_step_metrics(tmp_path):
    """RunGuards.after_step: a loss spike becomes a log line and the `loss_spikes` count; every straggler_every steps
    the step-time percentiles join the record (one process: itself, no straggler)."""
    from engine.training.guards import RunGuards

    cfg = load_config(["--resilience.straggler_every", "5", "--resilience.spike_window", "20"])
    guards = RunGuards(cfg, tmp_path, 0, torch.device("cpu"))
    lines, recs = [], {}
    for step in range(1, 31):
        loss = 3.0 - 0.01 * step + 0.002 * (step % 3) + (5.0 if step == 25 else 0.0)
        recs[step] = {}
        lines += guards.after_step(step, loss, 0.1 + 0.001 * step, recs[step])
    guards.close()
    assert len(lines) == 1 and lines[0].startswith("step 25: loss spike"), lines
    assert recs[24]["loss_spikes"] == 0 and recs[25]["loss_spikes"] == 1 and recs[30]["loss_spikes"] == 1
    assert [s for s, r in recs.items() if "step_time_p50_max" in r] == [5, 10, 15, 20, 25, 30]
    assert recs[30]["straggler_count"] == 0 and "gpu_temp_c" not in recs[30]  # no NVML on a CPU run
