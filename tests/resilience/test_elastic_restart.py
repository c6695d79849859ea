"""Fault injection under torchrun with `--max-restarts 2`: a rank dies (SIGKILL) or hangs mid-step; the job restarts
its workers, resumes from the latest complete checkpoint by itself (`--resume auto`), finishes with exit status 0,
and its per-step losses equal an uninterrupted run's bit for bit (fp32 on CPU).

The faults are test-local: a small launcher script (written into the test's directory) wraps
`engine.train._Run.train_step`; on the first attempt (TORCHELASTIC_RESTART_COUNT 0), rank 1 arms a global module
forward hook while the fault's step runs and, partway through that step's forward pass, either SIGKILLs itself (once
rank 0 has logged the step before, so the killed attempt leaves a record past the checkpoint that the resume must
set aside) or hangs in `_injected_hang` (a long sleep) until the engine's hang watchdog
(`--resilience.hang_timeout`) dumps its stacks and exits; rank 0 meanwhile goes on into the step's gradient
all-reduce and waits there for rank 1.
The script records, per attempt and rank, when the worker started, each step began, the fault, the watchdog firing
(`HangWatchdog._fire`, wrapped), a SIGTERM reaching the engine's pre-emption handler, and how the worker ended, so
the tests can check that both attempts ran and measure the time from the fault to the first step after the restart.
Both faulty runs are compared with one uninterrupted torchrun run (a module-scoped fixture).
"""

import json
import os
import re
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
COMMON = {"train__steps": STEPS, "checkpoint__every": CKPT_EVERY, "optim__decay_steps": STEPS, "eval__every": 3}
# The watchdog gives the first `warmup_steps` (5, HangWatchdog's default; RunGuards does not change it) steps of a
# process the first-step limit (30 s here): only step 6 is timed against max(2 s, 3 x median step time), which is
# 2 s for this model's ~0.05 s steps. So rank 1 hangs in step 6; the resume starts from step 4 and redoes 5 and 6.
HANG_STEP, HANG_TIMEOUT = 6, 2.0
HANG_FLAGS = ["--resilience.hang_timeout", str(HANG_TIMEOUT), "--resilience.hang_factor", "3",
              "--resilience.first_step_timeout", "30"]  # fmt: skip

LAUNCHER = r"""
import json, os, signal, sys, time

EVENTS = os.environ["FAULT_EVENTS"]
METRICS = os.environ["FAULT_METRICS"]
FAULT = os.environ.get("FAULT_KIND", "")  # "kill", "hang", or "": no fault
FAULT_STEP = int(os.environ.get("FAULT_STEP", "0"))
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
RANK = int(os.environ.get("RANK", "0"))


def event(kind, **kw):
    with open(EVENTS, "a") as f:
        rec = {"attempt": ATTEMPT, "rank": RANK, "event": kind, "t": time.time(), "pid": os.getpid(), **kw}
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


event("start")
import torch  # noqa: E402

import engine.resilience.preemption  # noqa: E402
import engine.resilience.watchdog  # noqa: E402
import engine.train  # noqa: E402

_original = engine.train._Run.train_step
_original_fire = engine.resilience.watchdog.HangWatchdog._fire
_original_sigterm = engine.resilience.preemption.PreemptionHandler._handle


def _injected_hang(step):
    event("hang", step=step)
    time.sleep(3600)


def train_step(self):
    step = self.step + 1  # the step about to run
    event("step", step=step)
    if FAULT and ATTEMPT == 0 and RANK == 1 and step == FAULT_STEP:
        calls = [0]

        def fault_in_forward(module, args, output):
            calls[0] += 1
            if calls[0] != 3:  # partway through the forward pass of this step
                return
            if FAULT == "hang":
                _injected_hang(step)
                return
            deadline = time.time() + 30  # rank 0 logs the previous step just after this rank starts this one
            while time.time() < deadline and not any(
                line.startswith('{"step": %d,' % (step - 1)) for line in open(METRICS).read().splitlines()
            ):
                time.sleep(0.01)
            event("kill", step=step)
            os.kill(os.getpid(), signal.SIGKILL)

        torch.nn.modules.module.register_module_forward_hook(fault_in_forward)
    return _original(self)


def fire(self, report):  # the watchdog's thread, before it dumps the stacks and calls os._exit
    event("fire", step=report.step, label=report.label, elapsed=report.elapsed_s, timeout=report.timeout_s)
    _original_fire(self, report)


def sigterm(self, signum, frame):  # the engine's pre-emption handler (only sets a flag)
    event("signal", signum=signum)
    _original_sigterm(self, signum, frame)


engine.train._Run.train_step = train_step
engine.resilience.watchdog.HangWatchdog._fire = fire
engine.resilience.preemption.PreemptionHandler._handle = sigterm
try:
    rc = engine.train.main(sys.argv[1:])
except BaseException as e:
    event("exit", error=f"{type(e).__name__}: {str(e)[:300]}")
    raise
event("exit", rc=rc)
sys.exit(rc)
"""


def _torchrun(root: Path, name: str, flags: list[str], fault: str = "", fault_step: int = 0, timeout: float = 120.0):
    """Runs the launcher under torchrun (2 processes, 2 restarts at most); returns (returncode, output, events)."""
    script = root / "launcher.py"
    script.write_text(LAUNCHER)
    events = root / f"{name}.events.jsonl"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "ENGINE_CACHE": str(root / "engine_cache"),
        "OMP_NUM_THREADS": "1",
        "FAULT_EVENTS": str(events),
        "FAULT_KIND": fault,
        "FAULT_STEP": str(fault_step),
        "FAULT_METRICS": str(root / name / "metrics.jsonl"),
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
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun (and whatever shares its process group)
        _kill_workers(_read_events(events), script)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun ({name}) did not finish within {timeout} s:\n{output[-6000:]}")
    return proc.returncode, output, _read_events(events)


def _read_events(events: Path) -> list[dict]:
    return [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []


def _kill_workers(events: list[dict], script: Path) -> None:
    """SIGKILLs the workers that are still running this launcher: torchrun starts each in a session of its own, so
    killing torchrun's process group leaves them (holding the output pipe open) behind."""
    for pid in {e["pid"] for e in events}:
        try:
            if str(script) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):  # gone already
            pass


_EVENT_KEYS = ("attempt", "rank", "event", "t", "pid")


def _by_step(run_dir: Path) -> dict[int, dict]:
    recs = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"a step logged twice in {run_dir}: {steps}"
    return {r["step"]: r for r in recs}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny data set and one uninterrupted torchrun run over it: (root, train prefix, valid prefix, run dir)."""
    root = tmp_path_factory.mktemp("elastic")
    train_prefix, valid_prefix = build_tiny_data(root / "data")
    t1 = time.perf_counter()
    ref_dir = root / "reference"
    rc, ref_out, ref_events = _torchrun(root, "reference", tiny_args(ref_dir, train_prefix, valid_prefix, **COMMON))
    print(f"\nuninterrupted torchrun job {time.perf_counter() - t1:.1f} s")
    assert rc == 0, f"uninterrupted torchrun exited {rc}:\n{ref_out[-6000:]}"
    assert {e["attempt"] for e in ref_events} == {0}
    assert not (ref_dir / SUPERSEDED_NAME).exists()
    return root, train_prefix, valid_prefix, ref_dir


def _assert_matches_reference(faulty_dir: Path, ref_dir: Path) -> dict[int, dict]:
    """Steps 0..STEPS each logged once, with the uninterrupted run's losses, gradient norms, learning rates, samples
    and validation losses, bit for bit; returns the faulty run's records by step."""
    faulty, ref = _by_step(faulty_dir), _by_step(ref_dir)
    assert sorted(faulty) == sorted(ref) == list(range(0, STEPS + 1))  # step 0: the evaluation before training
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", "lr", "consumed_samples"):
            assert faulty[step][key] == ref[step][key], (step, key, faulty[step][key], ref[step][key])
    for step in (0, 3, 6):
        assert faulty[step]["val_loss"] == ref[step]["val_loss"], (step, faulty[step]["val_loss"], ref[step])
    return faulty


def _assert_restarted_once(events: list[dict], out: str) -> None:
    """Both attempts ran on both ranks, and no third attempt."""
    starts = {(e["attempt"], e["rank"]) for e in events if e["event"] == "start"}
    assert starts == {(0, 0), (0, 1), (1, 0), (1, 1)}, f"worker starts (attempt, rank): {sorted(starts)}\n{out}"


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_mid_step_torchrun_restarts_and_matches_uninterrupted(tmp_path, reference):
    root, train_prefix, valid_prefix, ref_dir = reference
    t0 = time.perf_counter()
    faulty_dir = tmp_path / "faulty"
    rc, out, events = _torchrun(tmp_path, "faulty", tiny_args(faulty_dir, train_prefix, valid_prefix, **COMMON),
                                fault="kill", fault_step=KILL_STEP)  # fmt: skip
    faulty_s = time.perf_counter() - t0
    assert rc == 0, f"torchrun exited {rc} after the fault:\n{out[-6000:]}"

    # Both attempts ran: attempt 0 with the kill on rank 1, attempt 1 on both ranks, and no third attempt.
    _assert_restarted_once(events, out)
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

    faulty = _assert_matches_reference(faulty_dir, ref_dir)

    # What rank 0 logged of the killed attempt past the step-2 checkpoint (step 3) was set aside, and the redone
    # step 3 reproduced it exactly.
    superseded = read_metrics(faulty_dir / SUPERSEDED_NAME)
    assert [r["step"] for r in superseded] == [KILL_STEP - 1]
    assert superseded[0]["loss"] == faulty[KILL_STEP - 1]["loss"]
    assert superseded[0]["val_loss"] == faulty[KILL_STEP - 1]["val_loss"]


@pytest.mark.slow
@pytest.mark.distributed
def test_hung_rank_watchdog_fires_within_timeout_and_restart_completes(tmp_path, reference):
    """A hung rank: the watchdog fires within its timeout and the restart completes."""
    root, train_prefix, valid_prefix, ref_dir = reference
    t0 = time.perf_counter()
    faulty_dir = tmp_path / "hung"
    flags = tiny_args(faulty_dir, train_prefix, valid_prefix, **COMMON) + HANG_FLAGS
    rc, out, events = _torchrun(tmp_path, "hung", flags, fault="hang", fault_step=HANG_STEP, timeout=90.0)
    faulty_s = time.perf_counter() - t0
    assert rc == 0, f"torchrun exited {rc} after the hang:\n{out[-6000:]}"
    _assert_restarted_once(events, out)

    # Rank 1 hung in step 6 of attempt 0, and its own watchdog fired on that step against the 2 s limit (not the
    # 30 s first-step one), within the timeout plus a little scheduling slack.
    hangs = [e for e in events if e["event"] == "hang"]
    assert [(h["attempt"], h["rank"], h["step"]) for h in hangs] == [(0, 1, HANG_STEP)]
    fires = [e for e in events if e["event"] == "fire"]
    fired = [f for f in fires if f["rank"] == 1]
    assert [(f["attempt"], f["label"], f["step"], f["timeout"]) for f in fired] == [
        (0, "step", HANG_STEP, HANG_TIMEOUT)
    ], fires
    assert HANG_TIMEOUT <= fired[0]["elapsed"] < HANG_TIMEOUT + 3
    hang_to_fire_s = fired[0]["t"] - hangs[0]["t"]
    assert 0 < hang_to_fire_s < HANG_TIMEOUT + 3, hang_to_fire_s
    assert not [e for e in events if e["attempt"] == 0 and e["event"] == "step" and e["step"] > HANG_STEP]

    # The dump names the hanging function, under a header that names the step and the limit.
    dump = (faulty_dir / "hang_rank00001.txt").read_text()
    assert "_injected_hang" in dump, dump
    header = re.match(r"hang watchdog: rank 1, step (\d+), elapsed ([\d.]+)s > timeout ([\d.]+)s;", dump)
    assert header is not None, dump[:500]
    assert (int(header[1]), float(header[3])) == (HANG_STEP, HANG_TIMEOUT), dump[:500]

    # The restart resumed from the step-4 checkpoint (the latest before the hang) and redid steps 5-6.
    restarted = sorted((e for e in events if e["attempt"] == 1 and e["event"] == "step"), key=lambda e: e["t"])
    assert [e["step"] for e in restarted if e["rank"] == 1] == list(range(HANG_STEP - 1, STEPS + 1))
    resumed = [line for line in out.splitlines() if line.startswith("resumed from")]
    assert resumed == [f"resumed from {faulty_dir}/checkpoints/step_00000004 at step 4"], out[-6000:]

    # Watchdog firing -> attempt-1 workers / first step. Rank 0 meanwhile waits in the step's gradient all-reduce;
    # it must end promptly when rank 1 exits (a gloo error, its own watchdog, or torchrun's SIGTERM), not after
    # torchrun's 30 s SIGTERM -> SIGKILL grace period.
    t_fire = fired[0]["t"]
    t_start = min(e["t"] for e in events if e["attempt"] == 1 and e["event"] == "start")
    restart_s, first_step_s = t_start - t_fire, restarted[0]["t"] - t_fire
    rank0 = [e for e in events if e["attempt"] == 0 and e["rank"] == 0 and e["event"] in ("fire", "signal", "exit")]
    rank0_desc = (
        "; ".join(
            f"{e['event']} at {e['t'] - t_fire:+.2f} s "
            + json.dumps({k: v for k, v in e.items() if k not in _EVENT_KEYS})
            for e in rank0
        )
        or "no fire/signal/exit event (killed outright)"
    )
    rank0_dump = (faulty_dir / "hang_rank00000.txt").exists()
    print(f"\nhang: step-{HANG_STEP} hang -> rank-1 watchdog fires {hang_to_fire_s:.2f} s (watchdog elapsed "
          f"{fired[0]['elapsed']:.2f} s, limit {HANG_TIMEOUT} s); fire -> attempt-1 workers start {restart_s:.2f} s, "
          f"-> first step (step {restarted[0]['step']}) {first_step_s:.2f} s; hung torchrun job {faulty_s:.1f} s\n"
          f"rank 0 of attempt 0: {rank0_desc}; rank-0 dump: {rank0_dump}")  # fmt: skip
    assert 0 < restart_s < 20, (restart_s, rank0_desc, out[-6000:])
    assert 0 < first_step_s < 60

    faulty = _assert_matches_reference(faulty_dir, ref_dir)

    # Rank 0's record of step 5 (logged before the hang, past the step-4 checkpoint) was set aside, and the redone
    # step 5 reproduced it exactly.
    superseded = read_metrics(faulty_dir / SUPERSEDED_NAME)
    assert [r["step"] for r in superseded] == [HANG_STEP - 1]
    assert superseded[0]["loss"] == faulty[HANG_STEP - 1]["loss"]
