"""One training job per run directory: an exclusive `flock` on `RUN_DIR/.lock`, held for the job's whole life.

Two jobs writing the same run directory interleave metrics and race on checkpoints, and the second usually finds
out only when a resume loads a checkpoint the first is still writing. The lock is a kernel `flock` on an open file,
so it is released when the holder's process dies in any way (SIGKILL, OOM killer, node reboot for local disks):
a stale lock file never blocks a restart, and its contents (who holds it, for the error message) never decide
anything. On Linux NFS clients emulate `flock` with POSIX byte-range locks, which the server arbitrates across
nodes. Take the lock on one process of the job (global rank 0): a second open of the same file conflicts even
within one process. A process forked while holding the lock (a data loader worker) shares it until it exits.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import warnings
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = ".lock"
# errno values with which a filesystem refuses `flock` itself (some FUSE and network filesystems), as opposed to
# the lock being held: the job then runs unprotected rather than not at all.
_FLOCK_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


class RunDirLockedError(RuntimeError):
    """The run directory is locked by another live job; the message is one line for the user."""


def _holder_info() -> dict:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started}


def _describe_holder(fd: int) -> str:
    """' (host h, pid 123, started ...)' from the lock file, or '' when it cannot be read (being written, garbled)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode())
        return f" (host {info['host']}, pid {int(info['pid'])}, started {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


class RunDirLock:
    """An exclusive, non-blocking lock on `RUN_DIR/.lock`; `acquire()` raises `RunDirLockedError` if it is taken.

    Use as `with RunDirLock(run_dir): ...` or call `acquire()` at start-up and `release()` (or nothing: the kernel
    releases it at exit). `acquire()` on a lock this object already holds does nothing.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self.locked = False  # False while released, and when the filesystem could not lock (see `acquire`)

    def acquire(self) -> RunDirLock:
        """Locks the run directory (creating it) and records this process as the holder in the lock file."""
        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise RunDirLockedError(
                f"run directory {self.run_dir} is in use by another job{holder}; "
                "wait for it to finish or use another --run.dir"
            ) from None
        except OSError as e:
            if e.errno not in _FLOCK_UNSUPPORTED:
                os.close(fd)
                raise
            warnings.warn(
                f"the filesystem of {self.run_dir} does not support flock ({os.strerror(e.errno)}): running without "
                "the run-directory lock, so nothing stops a second job from writing the same directory",
                stacklevel=2,
            )
        else:
            self.locked = True
        self._fd = fd
        # Only the holder writes, after locking: truncate first so a reader never sees old bytes after new ones.
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder_info()) + "\n").encode(), 0)
        return self

    def release(self) -> None:
        """Clears the holder info and unlocks. The file stays: removing it would let a job that opened the old file
        and a job that creates a new one both hold 'the' lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            self.locked = False
            os.close(fd)  # closing the last descriptor of the open file releases the flock

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
