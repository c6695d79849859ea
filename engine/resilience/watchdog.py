"""Hang watchdog: a daemon thread that dumps every thread's stack and ends the process when a step runs too long.

A rank stuck in a collective (a peer died, a NCCL deadlock, a filesystem that stopped answering) otherwise waits
until the process group's timeout, often many minutes, and leaves no hint of where it was. The watchdog times each
step against `max(min_timeout_s, factor * median of recent step times)` (a fixed `first_timeout_s` until
`warmup_steps` steps were observed, since the first steps compile), and on expiry writes the stacks of all threads
to `DUMP_DIR/hang_rank{rank:05d}.txt` (appended, so an earlier hang's dump survives a restart), says so in one
line on stderr and calls `os._exit(exit_code)`, so that torchrun restarts the group from the last checkpoint.

Only time inside `step()` (or `step_started()`..`step_finished()`) and `phase()` is watched. Work between steps
that is not a step (checkpoint saves, evaluation) is either left unwatched, wrapped in `phase(name, timeout_s)`
with its own timeout, or excluded from a step's clock with `suspended()` (or `pause()`/`resume()`).

The thread sleeps on a condition until the running step's deadline or a change of state, so it costs nothing
between deadlines. It needs the GIL to run: a hang inside C code that holds the GIL is not detected.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import socket
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


@dataclass(frozen=True)
class HangReport:
    """What fired: the watched interval ("step" or a phase's name), the last step started (-1: none), the interval's
    elapsed time and timeout, and the dump file."""

    rank: int
    step: int
    label: str
    elapsed_s: float
    timeout_s: float
    path: Path


@dataclass
class _Interval:
    label: str
    step: int
    timeout_s: float
    elapsed_s: float = 0.0  # accumulated while the clock ran, up to `run_start`
    run_start: float | None = None  # monotonic time the clock last started; None while stopped
    fired: bool = False

    def elapsed(self, now: float) -> float:
        return self.elapsed_s + (now - self.run_start if self.run_start is not None else 0.0)


class HangWatchdog:
    """Watches steps and phases; fires when one runs past its timeout (see the module docstring).

    `on_fire(report)`, when given, replaces the exit (tests, or a caller that wants to act itself); the watchdog then
    keeps watching later steps. `history` is how many recent step times the median is taken over.
    """

    def __init__(
        self,
        dump_dir: str | Path,
        rank: int = 0,
        min_timeout_s: float = 120.0,
        factor: float = 10.0,
        warmup_steps: int = 5,
        first_timeout_s: float = 600.0,
        exit_code: int = 3,
        on_fire: Callable[[HangReport], None] | None = None,
        history: int = 100,
    ):
        self.dump_dir = Path(dump_dir)
        self.rank = rank
        self.min_timeout_s = float(min_timeout_s)
        self.factor = float(factor)
        self.warmup_steps = int(warmup_steps)
        self.first_timeout_s = float(first_timeout_s)
        self.exit_code = exit_code
        self.on_fire = on_fire
        self.path = self.dump_dir / f"hang_rank{rank:05d}.txt"
        self._times: deque[float] = deque(maxlen=max(history, 1))
        self._stack: list[_Interval] = []  # the step, and phases inside it; only the top one's clock runs
        self._paused = 0
        self._next_step = 0  # the number `step_started()` gives a step when the caller does not
        self._last_step = -1
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"hang-watchdog-rank{rank}", daemon=True)
        self._thread.start()

    # --- what the loop calls -------------------------------------------------------------------------------------

    @property
    def timeout_s(self) -> float:
        """The timeout the next step gets."""
        with self._cond:
            if len(self._times) < max(self.warmup_steps, 1):
                return self.first_timeout_s
            return max(self.min_timeout_s, self.factor * statistics.median(self._times))

    def step_started(self, step: int | None = None) -> None:
        """Starts watching a step (numbered `step`, else by count); an unfinished earlier step is dropped."""
        timeout = self.timeout_s
        with self._cond:
            number = self._next_step if step is None else step
            self._last_step, self._next_step = number, number + 1
            self._stack = [_Interval("step", number, timeout)]
            self._start_top()

    def step_finished(self, seconds: float | None = None) -> None:
        """Stops watching the step and records its time: `seconds`, else the watched time (pauses excluded)."""
        now = time.monotonic()
        with self._cond:
            steps = [i for i in self._stack if i.label == "step"]
            measured = steps[0].elapsed(now) if steps else None
            self._stack = []
            if seconds is None:
                seconds = measured
            if seconds is not None:
                self._times.append(float(seconds))
            self._cond.notify_all()

    @contextlib.contextmanager
    def step(self, step: int | None = None) -> Iterator[None]:
        """Watches the block as one step; its time is recorded only when it completes without an exception."""
        self.step_started(step)
        try:
            yield
        except BaseException:
            self._drop_all()
            raise
        self.step_finished()

    @contextlib.contextmanager
    def phase(self, label: str, timeout_s: float) -> Iterator[None]:
        """Watches the block with its own timeout, stopping the enclosing step's clock meanwhile; not recorded."""
        with self._cond:
            self._stop_top()
            interval = _Interval(label, self._last_step, float(timeout_s))
            self._stack.append(interval)
            self._start_top()
        try:
            yield
        finally:
            with self._cond:
                if interval in self._stack:
                    self._stop_top()
                    del self._stack[self._stack.index(interval) :]
                    self._start_top()

    def pause(self) -> None:
        """Stops the clock of whatever is watched until the matching `resume()` (pauses nest)."""
        with self._cond:
            self._paused += 1
            self._stop_top()

    def resume(self) -> None:
        with self._cond:
            if self._paused == 0:
                raise RuntimeError("HangWatchdog.resume() without a matching pause()")
            self._paused -= 1
            self._start_top()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Nothing inside the block counts towards a timeout (a checkpoint save or an evaluation inside a step)."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def close(self) -> None:
        """Stops the thread; nothing fires afterwards."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> HangWatchdog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals (callers hold self._cond) ---------------------------------------------------------------------

    def _start_top(self) -> None:
        if self._stack and self._paused == 0 and self._stack[-1].run_start is None:
            self._stack[-1].run_start = time.monotonic()
        self._cond.notify_all()

    def _stop_top(self) -> None:
        if self._stack and self._stack[-1].run_start is not None:
            top = self._stack[-1]
            top.elapsed_s, top.run_start = top.elapsed(time.monotonic()), None
        self._cond.notify_all()

    def _drop_all(self) -> None:
        with self._cond:
            self._stack = []
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                report = None
                while not self._closed and report is None:
                    top = self._stack[-1] if self._stack else None
                    if top is None or top.run_start is None or top.fired:
                        self._cond.wait()
                        continue
                    elapsed = top.elapsed(time.monotonic())
                    if elapsed < top.timeout_s:
                        self._cond.wait(top.timeout_s - elapsed)
                        continue
                    top.fired = True
                    report = HangReport(self.rank, top.step, top.label, elapsed, top.timeout_s, self.path)
                if self._closed:
                    return
            self._fire(report)

    def _fire(self, report: HangReport) -> None:
        what = f"step {report.step}" if report.label == "step" else f"{report.label} (last step {report.step})"
        summary = f"rank {report.rank}, {what}, elapsed {report.elapsed_s:.1f}s > timeout {report.timeout_s:.1f}s"
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            with open(report.path, "a") as f:
                f.write(f"hang watchdog: {summary}; host {socket.gethostname()}, pid {os.getpid()}, {stamp}\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
                f.write("\n")
            written = True
        except OSError as e:  # a full or vanished filesystem must not stop the exit: dump to stderr instead
            written, error = False, e
        where = f"stacks of all threads in {report.path}" if written else f"could not write {report.path} ({error})"
        print(f"hang watchdog: {summary}; {where}", file=sys.stderr, flush=True)
        if not written:
            with contextlib.suppress(Exception):  # stderr may be a pipe that is gone, or have no file descriptor
                faulthandler.dump_traceback(sys.stderr, all_threads=True)
        if self.on_fire is not None:
            self.on_fire(report)
        else:
            os._exit(self.exit_code)
