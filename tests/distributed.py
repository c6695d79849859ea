"""Runs a function in N real `torch.distributed` processes on the gloo backend, for tests.

Each process gets a free port, a clean teardown, and a child's traceback is raised in the parent, so a failing
rank fails the test with its own stack.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

# Imported once by the forkserver; each rank forks from it instead of importing torch and the engine again.
_PRELOAD = ["torch", "torch.distributed", "engine.model.gpt", "engine.parallel.parallelize", "engine.training.step"]


def _context() -> mp.context.BaseContext:
    """A forkserver whose server imported torch and the engine once (it holds no process group and no CUDA
    context): starting a rank costs a fork, not the seconds an import of torch takes on 2 cores, which under
    "spawn" dominated the distributed tests' time (tests/parallel/test_sequence.py: 17.6 s -> 7.0 s)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world_size: int, port: int, env: dict, args: tuple, queue, logs: str) -> None:
    os.environ.clear()  # the caller's environment now, not the forkserver's when it started
    os.environ.update(env)
    # The forkserver's stdout/stderr are not the caller's: write to files the caller copies to its own streams
    # (so pytest's capfd/capsys see what the ranks print, as with "spawn").
    for fd, name in ((1, "out"), (2, "err")):
        os.dup2(os.open(os.path.join(logs, f"{rank}.{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - any failure must reach the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _drain(queue, errors: dict[int, str], expected: int, wait: float = 3.0) -> None:
    """Collects up to `expected` more error reports, each arriving within `wait` seconds."""
    for _ in range(expected):
        try:
            rank, status, payload = queue.get(timeout=wait)
        except Exception:  # queue.Empty: the others are blocked or done
            return
        if status != "ok":
            errors[rank] = payload


def _relay(logs: str, world_size: int) -> None:
    """Copies the ranks' stdout and stderr, rank by rank, to this process's, then removes the files."""
    for name, stream in (("out", sys.stdout), ("err", sys.stderr)):
        for rank in range(world_size):
            path = os.path.join(logs, f"{rank}.{name}")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    stream.write(f.read())
        stream.flush()
    shutil.rmtree(logs, ignore_errors=True)


def run_distributed(
    fn: Callable, world_size: int, *args: Any, timeout: float = 300.0, env: dict | None = None
) -> list[Any]:
    """Calls `fn(rank, world_size, *args)` in `world_size` gloo processes (forked from the forkserver); returns
    results by rank.

    `fn` must be importable (defined at module level). The default process group is initialised before `fn`
    runs and destroyed after it.
    """
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    env = {**os.environ, **{k: str(v) for k, v in (env or {}).items()}}
    logs = tempfile.mkdtemp(prefix="run_distributed-")
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, env, args, queue, logs), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        for _ in range(world_size):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except Exception:  # queue.Empty: a rank hung or died without reporting
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                raise RuntimeError(
                    f"distributed test timed out after {timeout}s; ranks that died: {dead}; errors so far: "
                    + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in errors.items())
                ) from None
            if status == "ok":
                results[rank] = payload
            else:
                errors[rank] = payload
                # One failing rank usually leaves the others blocked in a collective: stop waiting for them,
                # but keep the errors the others report soon after (the first to arrive may not be the cause).
                _drain(queue, errors, world_size - len(results) - len(errors))
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        _relay(logs, world_size)
    if errors:
        first = min(errors)
        others = "".join(f"\n--- rank {r} also failed ---\n{tb}" for r, tb in sorted(errors.items()) if r != first)
        raise RuntimeError(f"rank {first} failed:\n{errors[first]}{others}")
    return [results[r] for r in range(world_size)]
