"""Small file helpers: temporary names renamed into place, fsync, and an fcntl lock.

Data files are written under a temporary name in the destination directory and renamed only when complete, so a
crash or Ctrl-C never leaves a half-written file under the final name (rename is atomic within one filesystem).
"""

import contextlib
import fcntl
import os
import socket
import uuid
from collections.abc import Iterator


def cache_root(cache_dir: str | None = None) -> str:
    """The engine's cache directory: `cache_dir` if given, else `$ENGINE_CACHE`, else ~/.cache/engine."""
    root = cache_dir or os.environ.get("ENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "engine")
    return os.path.abspath(root)


def _temp_stem(path: str) -> tuple[str, str]:
    head, tail = os.path.split(os.path.abspath(path))
    host = socket.gethostname().replace("-", "_") or "host"  # '-' separates the name's fields
    return head, f".{tail}.tmp-{host}-"


def temp_path(path: str) -> str:
    """A unique temporary name beside `path` (same directory, so the final rename stays atomic), naming the host and
    process that write it so that `remove_stale_temps` can tell an abandoned one from one being written."""
    head, stem = _temp_stem(path)
    return os.path.join(head, f"{stem}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def lock_temp(f) -> None:
    """Marks an open temporary file as being written: `remove_stale_temps` leaves a locked one alone. The lock (flock)
    goes with the file's last descriptor, so a killed writer's file is unlocked."""
    with contextlib.suppress(OSError):  # a filesystem without locks: the host and pid checks remain
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _locked(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True  # gone already, or not ours to read: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # no lock support here
    finally:
        os.close(fd)  # also drops the lock just taken
    return False


def remove_stale_temps(path: str) -> list[str]:
    """Removes temporary files of `path` left by killed writers (SIGKILL, power loss) on this host: those whose
    process is gone and that no one holds locked (`lock_temp`; the lock also covers a live writer in another pid
    namespace under the same host name). Temporaries of other hosts sharing the filesystem are left alone.
    Returns the removed paths."""
    head, stem = _temp_stem(path)
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(head):
            if not name.startswith(stem):
                continue
            pid = name[len(stem) :].split("-", 1)[0]
            full = os.path.join(head, name)
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)) and not _locked(full):
                remove_quietly(full)
                removed.append(full)
    return removed


def fsync_path(path: str) -> None:
    """Flushes a file's (or a directory's) contents to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Flushes the directory entry of `path`, so a rename into it survives a power loss."""
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories; the rename is still atomic
        fsync_path(os.path.dirname(os.path.abspath(path)) or ".")


def remove_quietly(*paths: str) -> None:
    """Removes files that may not exist."""
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator:
    """Opens a temporary file and renames it to `path` on success; on an exception the temporary file is removed."""
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path)
    except BaseException:
        remove_quietly(tmp)
        raise


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Holds an exclusive fcntl lock on `path` (created if needed) for the duration of the block.

    Other processes (ranks of one job, or two jobs) block in `file_lock` until the holder leaves; the lock is
    released by the OS if the holder dies, so a crashed preparation never wedges later callers.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
