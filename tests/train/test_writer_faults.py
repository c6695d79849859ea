"""The checkpoint writer killed for real (SIGKILL) at each phase of a save, and a full disk: the next start resumes
from the newest complete checkpoint and goes on as the uninterrupted run does."""

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.checkpoint import checkpointer
from engine.checkpoint.checkpointer import latest_checkpoint, verify_checkpoint
from engine.metrics import read_metrics
from engine.train import main
from tests.train.conftest import tiny_args

ROOT = Path(__file__).resolve().parents[2]
FLAGS = dict(eval__every=0, checkpoint__every=2, checkpoint__keep=1)

# Each phase: the checkpointer function whose call is the kill point, the condition on its first argument, and the
# checkpoint the next start resumes from (the step-4 save is the one killed).
PHASES = {
    "shards written": ("_save_file", "'.step_00000004.tmp' in str(args[1]) and 'model_' in str(args[1])", 2),
    "manifest written": ("_fsync_dir", "str(args[0]).endswith('.step_00000004.tmp')", 2),
    "renamed, latest not updated": ("atomic_write", "os.path.isdir(str(args[0])[:-6] + 'step_00000004')", 4),
    "during retention": ("_remove_doomed", "True", 4),
}

LAUNCHER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from engine.checkpoint import checkpointer
import engine.train

real = getattr(checkpointer, {fn!r})

def killer(*args, **kwargs):
    if {cond}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

setattr(checkpointer, {fn!r}, killer)
sys.exit(engine.train.main(sys.argv[1:]))
"""


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r.get("loss") is not None}


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_writer_killed_at_each_phase_resumes_from_the_newest_complete_checkpoint(tmp_path, tiny_data, phase,
                                                                                    engine_cache):  # fmt: skip
    fn, cond, resume_step = PHASES[phase]
    assert main(tiny_args(tmp_path / "straight", *tiny_data, **FLAGS)) == 0
    script = tmp_path / "launcher.py"
    script.write_text(textwrap.dedent(LAUNCHER.format(root=str(ROOT), fn=fn, cond=cond)))
    run = tmp_path / "run"
    env = {**os.environ, "ENGINE_CACHE": engine_cache}
    proc = subprocess.run([sys.executable, str(script), *tiny_args(run, *tiny_data, **FLAGS)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed mid-save
    found = latest_checkpoint(run / "checkpoints")
    assert found.name == f"step_{resume_step:08d}"
    verify_checkpoint(found)
    assert main(tiny_args(run, *tiny_data, **FLAGS)) == 0  # the next start, --resume auto
    assert _losses(run) == _losses(tmp_path / "straight")
    assert [d.name for d in (run / "checkpoints").iterdir() if d.name.startswith(".step")] == []


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays(tmp_path, tiny_data, monkeypatch, capsys):
    real = checkpointer._save_file

    def full(obj, path):
        if ".step_00000004.tmp" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(obj, path)

    monkeypatch.setattr(checkpointer, "_save_file", full)
    run = tmp_path / "run"
    assert main(tiny_args(run, *tiny_data, **FLAGS)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: could not write checkpoint step_00000004 under {run / 'checkpoints'}: No space")
    assert err[-1].endswith("; the previous checkpoints are intact")
    assert latest_checkpoint(run / "checkpoints").name == "step_00000002"
    verify_checkpoint(run / "checkpoints" / "step_00000002")
    assert not [p.name for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]  # the partial save is gone
