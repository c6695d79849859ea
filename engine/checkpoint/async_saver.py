"""Background checkpoint writes: the training step goes on while a thread writes a staged host copy.

The caller stages first (every tensor this rank writes copied to host memory, pinned when it lives on a GPU, so the
copy is one DMA and later updates of the live parameters do not leak into the checkpoint), then `submit`s the write.
The write's collectives (gathering checksums, the commit barrier) run on a process group of their own, created once
by every rank (`side_group`), so they never interleave with the training's collectives on the default group; this is
how `torch.distributed.checkpoint.async_save` keeps them apart too. One save is in flight at a time: `submit` first
waits for the previous one, and the run waits for the last before it ends. A write that failed raises its error at
that wait, on every rank (each rank's thread sees the collective fail or the error gathered).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def side_group() -> dist.ProcessGroup | None:
    """A gloo group over every rank for checkpoint collectives (None when not distributed); a collective call."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return dist.new_group(backend="gloo")


def stage(value: torch.Tensor) -> torch.Tensor:
    """A host copy of `value` that the training can no longer change (pinned memory for a CUDA tensor)."""
    value = value.detach()
    if value.device.type == "cuda":
        out = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        out.copy_(value, non_blocking=True)
        return out
    return value.clone()


def stage_tree(tree: Any) -> Any:
    """`stage` over the tensors in nested dicts, lists and tuples; synchronises the device once at the end."""
    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return stage(x)
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        return x

    out = walk(tree)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the non-blocking copies have landed before the thread reads them
    return out


@dataclass
class SaveRecord:
    step: int
    result: Any = None  # what the write returned (the checkpoint's path)
    write_s: float = 0.0  # time the background write took


class AsyncSaver:
    """Runs one checkpoint write at a time in a daemon thread."""

    def __init__(self) -> None:
        self._group: dist.ProcessGroup | None = None
        self._has_group = False
        self._thread: threading.Thread | None = None
        self._record: SaveRecord | None = None
        self._error: BaseException | None = None

    def group(self) -> dist.ProcessGroup | None:
        """The saves' own process group (`side_group`), made on first use: every rank calls this at its first
        save, at the same point."""
        if not self._has_group:
            self._group, self._has_group = side_group(), True
        return self._group

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, step: int, write: Callable[[], Any]) -> SaveRecord | None:
        """Starts `write()` in the background after waiting for the previous save; returns the previous save's
        record (None if there was none)."""
        previous = self.wait()
        record = SaveRecord(step)

        def run() -> None:
            t0 = time.perf_counter()
            try:
                record.result = write()
            except BaseException as e:  # raised in the training thread at the next wait
                self._error = e
            record.write_s = time.perf_counter() - t0

        self._record = record
        self._thread = threading.Thread(target=run, name=f"checkpoint-step-{step}", daemon=True)
        self._thread.start()
        return previous

    def wait(self) -> SaveRecord | None:
        """Waits for the save in flight; returns its record, or raises what it raised."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread, record = None, self._record
        self._record = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return record
