"""RunDirLock: a second process is refused with a one-line message naming the holder; release and SIGKILL free it."""

import errno
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.resilience.run_lock import RunDirLock, RunDirLockedError

ROOT = Path(__file__).resolve().parents[2]
_ACQUIRE = """
import sys
from engine.resilience.run_lock import RunDirLock, RunDirLockedError
try:
    RunDirLock(sys.argv[1]).acquire()
except RunDirLockedError as e:
    print(e)
    sys.exit(7)
print("locked", flush=True)
if len(sys.argv) > 2:
    sys.stdin.read()  # hold the lock until killed
"""


def _python(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", _ACQUIRE, *args], env=env, text=True, **kwargs)


def _try_acquire(run_dir: Path) -> subprocess.CompletedProcess:
    proc = _python(str(run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_second_process_is_refused_until_release(tmp_path):
    run_dir = tmp_path / "runs" / "a"
    lock = RunDirLock(run_dir).acquire()
    assert lock.locked and (run_dir / ".lock").exists()
    refused = _try_acquire(run_dir)
    assert refused.returncode == 7, refused.stderr
    message = refused.stdout.strip()
    assert "\n" not in message
    assert message.startswith(f"run directory {run_dir} is in use by another job (host ")
    assert f"pid {os.getpid()}, started 20" in message and message.endswith("use another --run.dir")
    lock.release()
    assert not lock.locked and (run_dir / ".lock").read_text() == ""
    freed = _try_acquire(run_dir)
    assert freed.returncode == 0 and freed.stdout.strip() == "locked", freed.stdout + freed.stderr


def test_same_process_second_lock_and_context_manager(tmp_path):
    with RunDirLock(tmp_path) as lock:
        assert lock.acquire() is lock  # idempotent on the holder
        with pytest.raises(RunDirLockedError, match=f"pid {os.getpid()}"):
            RunDirLock(tmp_path).acquire()
    with RunDirLock(tmp_path):
        pass


def test_unreadable_holder_info_says_another_job(tmp_path):
    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a holder that has not written its info yet
        with pytest.raises(RunDirLockedError) as info:
            RunDirLock(tmp_path).acquire()
        assert str(info.value) == (
            f"run directory {tmp_path} is in use by another job; wait for it to finish or use another --run.dir"
        )
    finally:
        os.close(fd)


def test_killed_holder_leaves_the_lock_free(tmp_path):
    holder = _python(str(tmp_path), "hold", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLockedError, match=f"pid {holder.pid},"):
            RunDirLock(tmp_path).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert f'"pid": {holder.pid}' in (tmp_path / ".lock").read_text()  # stale info left behind: ignored
    with RunDirLock(tmp_path) as lock:
        assert lock.locked and f'"pid": {os.getpid()}' in (tmp_path / ".lock").read_text()


def test_filesystem_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.warns(UserWarning, match="does not support flock"):
        lock = RunDirLock(tmp_path).acquire()
    assert not lock.locked
    lock.release()
