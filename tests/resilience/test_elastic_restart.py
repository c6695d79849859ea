"""Fault injection under torchrun: SIGKILL a rank mid-step with `--max-restarts 2`; the job restarts its workers,
resumes from the latest complete checkpoint by itself (`--resume auto`), finishes with exit status 0, and its
per-step losses equal an uninterrupted run's bit for bit (fp32 on CPU).

The fault is test-local: a small launcher script (written into tmp_path) wraps `engine.train._Run.train_step`; on
the first attempt (TORCHELASTIC_RESTART_COUNT 0), rank 1 arms a global module forward hook while step KILL_STEP runs
and SIGKILLs itself partway through that step's forward pass (once rank 0 has logged the step before, so the
killed attempt leaves a record past the checkpoint that the resume must set aside), while rank 0 goes on into the
step's gradient all-reduce.
The script also records, per attempt and rank, when the worker started, the kill, and when each step began, so the
test can check that both attempts ran and measure the time from the kill to the first step after the restart.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.metrics import SUPERSEDED_NAME, read_metrics
from tests.distributed import free_port
from tests.train.conftest import build_tiny_data, tiny_args

REPO = Path(__file__).resolve().parents[2]
STEPS, CKPT_EVERY, KILL_STEP = 6, 2, 4  # checkpoints at 2, 4, 6; rank 1 dies in step 4: steps 3 and 4 are redone

LAUNCHER = r"""
import json, os, signal, sys, time

EVENTS = os.environ["FAULT_EVENTS"]
METRICS = os.environ["FAULT_METRICS"]
KILL_STEP = int(os.environ.get("FAULT_KILL_STEP", "0"))  # 0: no fault
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
RANK = int(os.environ.get("RANK", "0"))


def event(kind, **kw):
    with open(EVENTS, "a") as f:
        f.write(json.dumps({"attempt": ATTEMPT, "rank": RANK, "event": kind, "t": time.time(), **kw}) + "\n")
        f.flush()
        os.fsync(f.fileno())


event("start")
import torch  # noqa: E402

import engine.train  # noqa: E402

_original = engine.train._Run.train_step


def train_step(self):
    step = self.step + 1  # the step about to run
    event("step", step=step)
    if KILL_STEP and ATTEMPT == 0 and RANK == 1 and step == KILL_STEP:
        calls = [0]

        def kill_in_forward(module, args, output):
            calls[0] += 1
            if calls[0] == 3:  # partway through the forward pass of this step
                deadline = time.time() + 30  # rank 0 logs the previous step just after this rank starts this one
                while time.time() < deadline and not any(
                    line.startswith('{"step": %d,' % (step - 1)) for line in open(METRICS).read().splitlines()
                ):
                    time.sleep(0.01)
                event("kill", step=step)
                os.kill(os.getpid(), signal.SIGKILL)

        torch.nn.modules.module.register_module_forward_hook(kill_in_forward)
    return _original(self)


engine.train._Run.train_step = train_step
sys.exit(engine.train.main(sys.argv[1:]))
"""


def _torchrun(tmp_path: Path, name: str, flags: list[str], kill_step: int, timeout: float = 120.0):
    """Runs the launcher under torchrun (2 processes, 2 restarts at most); returns (returncode, output, events)."""
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    events = tmp_path / f"{name}.events.jsonl"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "ENGINE_CACHE": str(tmp_path / "engine_cache"),
        "OMP_NUM_THREADS": "1",
        "FAULT_EVENTS": str(events),
        "FAULT_KILL_STEP": str(kill_step),
        "FAULT_METRICS": str(tmp_path / name / "metrics.jsonl"),
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--max-restarts", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        "--monitor-interval", "0.5", str(script), *flags,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the workers it started
        output, _ = proc.communicate()
        pytest.fail(f"torchrun ({name}) did not finish within {timeout} s:\n{output[-6000:]}")
    recs = [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []
    return proc.returncode, output, recs


def _by_step(run_dir: Path) -> dict[int, dict]:
    recs = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"a step logged twice in {run_dir}: {steps}"
    return {r["step"]: r for r in recs}


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_mid_step_torchrun_restarts_and_matches_uninterrupted(tmp_path):
    train_prefix, valid_prefix = build_tiny_data(tmp_path / "data")
    common = {"train__steps": STEPS, "checkpoint__every": CKPT_EVERY, "optim__decay_steps": STEPS, "eval__every": 3}

    t0 = time.perf_counter()
    faulty_dir = tmp_path / "faulty"
    rc, out, events = _torchrun(tmp_path, "faulty", tiny_args(faulty_dir, train_prefix, valid_prefix, **common),
                                kill_step=KILL_STEP)  # fmt: skip
    faulty_s = time.perf_counter() - t0
    assert rc == 0, f"torchrun exited {rc} after the fault:\n{out[-6000:]}"

    # Both attempts ran: attempt 0 with the kill on rank 1, attempt 1 on both ranks, and no third attempt.
    starts = {(e["attempt"], e["rank"]) for e in events if e["event"] == "start"}
    assert starts == {(0, 0), (0, 1), (1, 0), (1, 1)}, f"worker starts (attempt, rank): {sorted(starts)}\n{out}"
    kills = [e for e in events if e["event"] == "kill"]
    assert [(k["attempt"], k["rank"], k["step"]) for k in kills] == [(0, 1, KILL_STEP)]
    assert not [e for e in events if e["attempt"] == 0 and e["event"] == "step" and e["step"] > KILL_STEP]

    # The restart resumed from the step-2 checkpoint (the latest complete one before the kill) and redid steps 3-4.
    restarted = sorted((e for e in events if e["attempt"] == 1 and e["event"] == "step"), key=lambda e: e["t"])
    assert [e["step"] for e in restarted if e["rank"] == 1] == list(range(CKPT_EVERY + 1, STEPS + 1))
    resumed = [line for line in out.splitlines() if line.startswith("resumed from")]
    assert resumed == [f"resumed from {faulty_dir}/checkpoints/step_00000002 at step 2"], out[-6000:]

    # Kill -> first step after the restart (process start and imports, rendezvous, checkpoint load included).
    t_kill = kills[0]["t"]
    t_start = min(e["t"] for e in events if e["attempt"] == 1 and e["event"] == "start")
    restart_s, first_step_s = t_start - t_kill, restarted[0]["t"] - t_kill
    print(f"\nelastic restart: kill -> attempt-1 workers start {restart_s:.2f} s, -> first step "
          f"(step {restarted[0]['step']}) {first_step_s:.2f} s; faulty torchrun job {faulty_s:.1f} s")  # fmt: skip
    assert 0 < first_step_s < 60

    t1 = time.perf_counter()
    ref_dir = tmp_path / "reference"
    rc, ref_out, ref_events = _torchrun(tmp_path, "reference", tiny_args(ref_dir, train_prefix, valid_prefix, **common),
                                        kill_step=0)  # fmt: skip
    print(f"uninterrupted torchrun job {time.perf_counter() - t1:.1f} s")
    assert rc == 0, f"uninterrupted torchrun exited {rc}:\n{ref_out[-6000:]}"
    assert {e["attempt"] for e in ref_events} == {0}

    faulty, ref = _by_step(faulty_dir), _by_step(ref_dir)
    assert sorted(faulty) == sorted(ref) == list(range(0, STEPS + 1))  # step 0: the evaluation before training
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", "lr", "consumed_samples"):
            assert faulty[step][key] == ref[step][key], (step, key, faulty[step][key], ref[step][key])
    for step in (0, 3, 6):
        assert faulty[step]["val_loss"] == ref[step]["val_loss"], (step, faulty[step]["val_loss"], ref[step])

    # What rank 0 logged of the killed attempt past the step-2 checkpoint (step 3) was set aside, and the redone
    # step 3 reproduced it exactly.
    superseded = read_metrics(faulty_dir / SUPERSEDED_NAME)
    assert [r["step"] for r in superseded] == [KILL_STEP - 1]
    assert superseded[0]["loss"] == faulty[KILL_STEP - 1]["loss"]
    assert superseded[0]["val_loss"] == faulty[KILL_STEP - 1]["val_loss"]
    assert not (ref_dir / SUPERSEDED_NAME).exists()
