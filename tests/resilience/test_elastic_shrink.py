"""Elastic shrink: with `torchrun --nnodes 1:2` (c10d rendezvous) a lost node shrinks dp and training continues.

Two torchrun agents on this machine act as two nodes, one worker each: agent A hosts the c10d rendezvous store
(`is_host=true`), agent B joins it (`is_host=false`); the first rendezvous round completes with both (max nodes
reached), so the job trains at dp 2. Once the job has saved a checkpoint, agent B and its worker are SIGKILLed
(B's whole process group: a node lost). A's worker fails in its next gloo collective (the peer's connection is
gone; `--resilience.pg_timeout` is short as a backstop), A's agent restarts its workers (`--max-restarts`) and
joins the next rendezvous round: B's participation expires after `keep_alive_interval x keep_alive_max_attempt`
(1 s x 3 here) without heartbeats, the round moves on, and A completes it alone (min nodes 1) after
`last_call_timeout`. The new world size is 1: `--resume auto` resumes from the latest complete checkpoint,
resharding it from dp 2 to dp 1 with the same global batch, and the job runs to the end; A exits 0.

The launcher (written into the test's directory) wraps `engine.train.main`: it records, per agent, attempt and
rank, the worker's start (with WORLD_SIZE and the node rank), each step and how the worker ended; on attempt 0 it
sleeps before each step so the kill lands mid-run. Losses and learning rates for every step equal an uninterrupted
two-process torchrun run's to 1e-5 relative, gradient norms to 1e-4 (the engine's layout-invariance contract; the
dp-2 steps before the kill match bit for bit).
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

from engine.metrics import read_metrics
from tests.distributed import free_port
from tests.train.conftest import build_tiny_data, tiny_args

REPO = Path(__file__).resolve().parents[2]
STEPS, CKPT_EVERY, STEP_SLEEP = 40, 2, 0.4  # attempt 0 sleeps 0.4 s before each step: the kill lands mid-run
COMMON = {"train__steps": STEPS, "train__micro_batch": 1, "checkpoint__every": CKPT_EVERY,
          "optim__decay_steps": STEPS, "eval__every": 10, "resilience__pg_timeout": 20}  # fmt: skip
# Rendezvous: B's lost heartbeats expire after 1 s x 3; a round with fewer than max nodes completes 3 s after the
# min-th node joined (so B must join within 3 s of A on the first round: both start together).
RDZV_CONF = "join_timeout=60,last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=3,read_timeout=30"

LAUNCHER = r"""
import json, os, sys, time

EVENTS = os.environ["SHRINK_EVENTS"]
AGENT = os.environ["SHRINK_AGENT"]
SLEEP = float(os.environ.get("SHRINK_STEP_SLEEP", "0"))
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
RANK = int(os.environ.get("RANK", "0"))


def event(kind, **kw):
    rec = {"agent": AGENT, "attempt": ATTEMPT, "rank": RANK, "event": kind, "t": time.time(), **kw}
    with open(EVENTS, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


event("start", pid=os.getpid(), world_size=int(os.environ["WORLD_SIZE"]), group_rank=int(os.environ["GROUP_RANK"]))
import engine.train  # noqa: E402

_original = engine.train._Run.train_step


def train_step(self):
    if SLEEP and ATTEMPT == 0:
        time.sleep(SLEEP)
    event("step", step=self.step + 1, world_size=self.world, dp=self.dp)
    return _original(self)


engine.train._Run.train_step = train_step
try:
    rc = engine.train.main(sys.argv[1:])
except BaseException as e:
    event("exit", error=f"{type(e).__name__}: {str(e)[:300]}")
    raise
event("exit", rc=rc)
sys.exit(rc)
"""


def _env(root: Path, agent: str, sleep: float) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "ENGINE_CACHE": str(root / "engine_cache"),
        "OMP_NUM_THREADS": "1",
        "SHRINK_EVENTS": str(root / "events.jsonl"),
        "SHRINK_AGENT": agent,
        "SHRINK_STEP_SLEEP": str(sleep),
    }


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A torchrun agent in its own process group (killing the group kills the agent with its workers)."""
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_agent(proc: subprocess.Popen, root: Path, agent: str) -> None:
    """SIGKILLs a torchrun agent's process group and its workers' (torchrun starts each worker in a new session, so
    killing the agent's group alone would leave them running): the node is lost."""
    _killpg(proc.pid)
    for e in _events(root):
        if e["agent"] == agent and e["event"] == "start":
            _killpg(e["pid"])
    proc.wait()


def _events(root: Path) -> list[dict]:
    path = root / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _by_step(run_dir: Path) -> dict[int, dict]:
    recs = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"a step logged twice in {run_dir}: {steps}"
    return {r["step"]: r for r in recs}


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


@pytest.mark.slow
@pytest.mark.distributed
def test_lost_node_shrinks_dp_and_training_continues(tmp_path):
    t_test = time.perf_counter()
    train_prefix, valid_prefix = build_tiny_data(tmp_path / "data")
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    torchrun = [sys.executable, "-m", "torch.distributed.run"]

    # The uninterrupted reference: one torchrun agent, two workers (dp 2), no sleeps.
    ref_root, ref_dir = tmp_path / "ref", tmp_path / "ref" / "run"
    ref_root.mkdir()
    ref_cmd = [*torchrun, "--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.5", str(script),
               *tiny_args(ref_dir, train_prefix, valid_prefix, **COMMON)]  # fmt: skip
    ref = _start(ref_cmd, _env(ref_root, "ref", 0.0), ref_root / "torchrun.log")
    try:
        ref_rc = ref.wait(timeout=90)
    except subprocess.TimeoutExpired:
        _kill_agent(ref, ref_root, "ref")
        pytest.fail(f"the reference did not finish in 90 s:\n{(ref_root / 'torchrun.log').read_text()[-6000:]}")
    assert ref_rc == 0, (ref_root / "torchrun.log").read_text()[-6000:]
    ref_s = time.perf_counter() - t_test

    # The elastic job: agents A (hosts the rendezvous store) and B, one worker each, nodes 1..2.
    run_dir, port = tmp_path / "run", free_port()
    flags = tiny_args(run_dir, train_prefix, valid_prefix, **COMMON)

    def agent_cmd(is_host: bool) -> list[str]:
        return [*torchrun, "--nnodes", "1:2", "--nproc-per-node", "1", "--max-restarts", "3",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "shrink",
                "--rdzv-conf", f"is_host={str(is_host).lower()},{RDZV_CONF}", "--monitor-interval", "0.5",
                str(script), *flags]  # fmt: skip

    log_a, log_b = tmp_path / "agent_a.log", tmp_path / "agent_b.log"
    t0 = time.perf_counter()
    a = _start(agent_cmd(True), _env(tmp_path, "A", STEP_SLEEP), log_a)
    b = _start(agent_cmd(False), _env(tmp_path, "B", STEP_SLEEP), log_b)
    try:
        # Wait for a complete checkpoint of the dp-2 job, then lose node B (agent and worker) at once.
        deadline = time.time() + 60
        ckpts = run_dir / "checkpoints"
        while time.time() < deadline and not (ckpts.is_dir() and any(
            (p / "manifest.json").is_file() for p in ckpts.glob("step_*")
        )):  # fmt: skip
            assert a.poll() is None and b.poll() is None, (log_a.read_text()[-4000:], log_b.read_text()[-4000:])
            time.sleep(0.05)
        assert time.time() < deadline, f"no checkpoint within 60 s:\n{log_a.read_text()[-6000:]}"
        t_kill, kill_at = time.time(), time.perf_counter() - t0
        _kill_agent(b, tmp_path, "B")
        try:
            rc_a = a.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"agent A did not finish within 90 s of the kill:\n{log_a.read_text()[-8000:]}")
    finally:
        _kill_agent(a, tmp_path, "A")
        _kill_agent(b, tmp_path, "B")
    job_s = time.perf_counter() - t0
    out = log_a.read_text()
    assert rc_a == 0, f"agent A exited {rc_a}:\n{out[-8000:]}"

    # Attempt 0 ran at world size 2 on both agents; A's final attempt ran alone at world size 1, to the end.
    events = _events(tmp_path)
    starts = [e for e in events if e["event"] == "start"]
    assert sorted((e["agent"], e["attempt"], e["world_size"]) for e in starts if e["attempt"] == 0) == [
        ("A", 0, 2), ("B", 0, 2)
    ], starts  # fmt: skip
    last = max(e["attempt"] for e in starts if e["agent"] == "A")
    assert last >= 1
    assert [(e["world_size"], e["rank"]) for e in starts if e["agent"] == "A" and e["attempt"] == last] == [(1, 0)]
    (tmp_path / "world_sizes.json").write_text(json.dumps([[e["agent"], e["attempt"], e["world_size"]]
                                                           for e in starts]))  # fmt: skip
    final_steps = [e for e in events if e["event"] == "step" and e["agent"] == "A" and e["attempt"] == last]
    assert {(e["world_size"], e["dp"]) for e in final_steps} == {(1, 1)}
    exits = [e for e in events if e["event"] == "exit" and e["agent"] == "A" and e["attempt"] == last]
    assert [e.get("rc") for e in exits] == [0], exits

    # The shrunk attempt resumed from the latest complete checkpoint, resharding it from dp 2 to dp 1, mid-run.
    resumed = re.findall(r"resumed from \S+/checkpoints/step_(\d{8}) at step (\d+)", out)
    assert len(resumed) == 1, out[-8000:]
    resume_step = int(resumed[0][1])
    assert CKPT_EVERY <= resume_step < STEPS, resumed
    note = f"resharding step_{resume_step:08d} from world_size=2 dp=2"
    assert re.search(re.escape(note) + r".* to world_size=1 dp=1", out), out[-8000:]
    assert [e["step"] for e in final_steps] == list(range(resume_step + 1, STEPS + 1))

    # Every step logged once, with the uninterrupted dp-2 run's loss, gradient norm and learning rate.
    got, want = _by_step(run_dir), _by_step(ref_dir)
    assert sorted(got) == sorted(want) == list(range(0, STEPS + 1))  # step 0: the evaluation before training
    for step in range(1, STEPS + 1):
        for key, rel in (("loss", 1e-5), ("grad_norm", 1e-4), ("lr", 1e-5)):  # norms to 1e-4, as test_model_tp's
            assert _close(got[step][key], want[step][key], rel), (step, key, got[step][key], want[step][key])
    for step in range(0, STEPS + 1, COMMON["eval__every"]):
        assert _close(got[step]["val_loss"], want[step]["val_loss"]), (step, got[step], want[step])
    for step in range(1, resume_step + 1):  # the dp-2 steps before the kill: the same layout, bit for bit
        assert got[step]["loss"] == want[step]["loss"], (step, got[step]["loss"], want[step]["loss"])

    # Kill -> A's dp-2 worker fails -> the shrunk attempt's worker starts -> its first step.
    failed = [e for e in events if e["event"] == "exit" and e["agent"] == "A" and e["attempt"] == 0]
    t_fail = failed[0]["t"] if failed else float("nan")
    t_start = min(e["t"] for e in starts if e["agent"] == "A" and e["attempt"] == last)
    t_step = min(e["t"] for e in final_steps)
    print(f"\nelastic shrink: kill B at {kill_at:.1f} s into the job; kill -> A's dp-2 worker fails "
          f"{t_fail - t_kill:.2f} s, -> A's world-size-1 worker starts {t_start - t_kill:.2f} s, -> first step "
          f"(step {resume_step + 1}) {t_step - t_kill:.2f} s; "
          f"A's attempts {last + 1}; reference {ref_s:.1f} s, elastic job {job_s:.1f} s, "
          f"test {time.perf_counter() - t_test:.1f} s")  # fmt: skip
    assert 0 < t_step - t_kill < 60
