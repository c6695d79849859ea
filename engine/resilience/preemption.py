"""Pre-emption: turn SIGTERM into a flag the training loop polls, so it saves a checkpoint and exits between steps.

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM and a grace period before SIGKILL. The handler only
sets a flag: saving from inside a signal handler would run the checkpoint protocol and its collectives at an
arbitrary point of a step. The signal reaches ranks at different times (or only some of them), so `should_stop()`
all-reduces the flag (MAX) and every rank sees the same answer at the same step; call it at the same point of every
step on every rank, since it is a collective.
"""

from __future__ import annotations

import signal
import threading
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist


class PreemptionHandler:
    """Sets `requested` when one of `signals` arrives; `should_stop()` agrees on it across ranks.

    `device` is where the all-reduced flag lives: "cpu" for gloo, the rank's CUDA device for NCCL. `install()` (or
    `with PreemptionHandler() as handler:`) replaces the signals' handlers and `uninstall()` restores the previous
    ones. Python delivers signals to the main thread only, so installing from another thread installs nothing (a
    warning says so) and the flag stays False unless `request()` is called.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), device: str | torch.device = "cpu"):
        self.signals = tuple(signals)
        self.device = torch.device(device)
        self._requested = False
        self.signal_received: int | None = None  # the first signal that set the flag, for logging
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether this process was asked to stop (a signal, or `request()`); it stays set."""
        return self._requested

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def request(self) -> None:
        """Sets the flag as a signal would (another trigger: a file, a time limit, a test)."""
        self._requested = True

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal_received is None:
            self.signal_received = signum
        self._requested = True

    def install(self) -> PreemptionHandler:
        if self.installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("PreemptionHandler installed outside the main thread: no signal handler set", stacklevel=2)
            return self
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except (ValueError, OSError):  # not the main interpreter, or a signal that cannot be caught
            self.uninstall()
            raise
        return self

    def uninstall(self) -> None:
        """Restores the handlers found at `install()`. One set outside Python (reported as None) becomes SIG_DFL."""
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def should_stop(self, group: dist.ProcessGroup | None = None) -> bool:
        """True on every rank when any rank of `group` (default: the world) has `requested`; a collective under
        an initialised process group of more than one rank, the local flag otherwise."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) <= 1:
            return self._requested
        flag = torch.tensor([1.0 if self._requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item() > 0)

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
