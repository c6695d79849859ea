"""The resilience pieces a training run holds, wired from `[resilience]` (engine.resilience holds each piece).

- One job per run directory: global rank 0 holds `RunDirLock` on RUN_DIR/.lock for the job's life; a second job is
  refused on every rank with one line naming the holder.
- Pre-emption: SIGTERM sets a flag that the ranks all-reduce after every step, so all of them save the same step
  and exit cleanly.
- Hangs: `HangWatchdog` times each step against a limit derived from the observed step times and, past it, dumps
  every thread's stack to RUN_DIR/hang_rankNNNNN.txt and exits non-zero so torchrun restarts the group. Evaluation
  and checkpoint saves run as phases with their own limit.
- Loss spikes are counted against a robust running fence (`LossSpikeDetector`); stragglers are named every
  `straggler_every` steps; GPU health (NVML) is sampled every `health_every` steps where NVML is present.
The non-finite gradient policy (skip, rollback, stop) is the loop's: it acts on the step result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint.training_state import agreed
from engine.config import Config
from engine.resilience.gpu_health import GpuHealth
from engine.resilience.preemption import PreemptionHandler
from engine.resilience.run_lock import RunDirLock, RunDirLockedError
from engine.resilience.spikes import LossSpikeDetector
from engine.resilience.stragglers import StragglerMonitor
from engine.resilience.watchdog import HangWatchdog


class RunGuards:
    """Built by every rank of a run; `close` releases what it holds (also after an error)."""

    def __init__(self, cfg: Config, run_dir: Path, rank: int, device: torch.device) -> None:
        r = cfg.resilience
        self.run_dir, self.rank, self.device = run_dir, rank, device
        self.lock = RunDirLock(run_dir) if rank == 0 else None
        self.preemption = PreemptionHandler(device=device)
        self.watchdog = None
        if r.hang_timeout > 0:
            self.watchdog = HangWatchdog(run_dir, rank=rank, min_timeout_s=r.hang_timeout, factor=r.hang_factor,
                                         first_timeout_s=max(r.hang_timeout, r.first_step_timeout))  # fmt: skip
        self.phase_timeout = max(r.hang_timeout, r.first_step_timeout)
        self.spikes = LossSpikeDetector(window=r.spike_window, factor=r.spike_factor) if r.spike_factor > 0 else None
        self.stragglers = StragglerMonitor(r.straggler_every, r.straggler_threshold) if r.straggler_every > 0 else None
        self.health_every = r.health_every
        self.health = GpuHealth(device.index or 0) if device.type == "cuda" and r.health_every > 0 else None

    def lock_run_dir(self, required: bool) -> None:
        """Takes the run directory's lock on rank 0 (when it exists, or when `required`: the loop is about to write
        it); every rank raises the same one-line error when another job holds it. A collective."""
        problem = None
        if self.lock is not None and not self.lock.locked and (required or self.run_dir.is_dir()):
            try:
                self.lock.acquire()
            except RunDirLockedError as e:
                problem = str(e)
        problem = agreed(problem)
        if problem is not None:
            raise RunDirLockedError(problem)

    def start(self) -> None:
        self.preemption.install()

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """The watchdog's timing of one training step."""
        with self.watchdog.step(step) if self.watchdog is not None else contextlib.nullcontext():
            yield

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        """A phase between steps (evaluation, a checkpoint save) under its own limit."""
        if self.watchdog is None:
            yield
            return
        with self.watchdog.phase(label, self.phase_timeout):
            yield

    def after_step(self, step: int, loss: float, step_time_s: float, rec: dict[str, Any]) -> list[str]:
        """Spike, straggler and GPU health checks after step `step`; adds their metrics to `rec` and returns lines
        for the log. Every rank calls it at every step (the straggler report is a collective)."""
        lines = []
        if self.spikes is not None:
            reason = self.spikes.observe(step, loss)
            rec["loss_spikes"] = self.spikes.spikes
            if reason is not None and reason.startswith("spike"):
                lines.append(f"step {step}: loss {reason}")
        if self.stragglers is not None:
            self.stragglers.record(step_time_s)
            report = self.stragglers.report(step)
            if report is not None:
                rec.update(report.metrics())
                if report.text():
                    lines.append(f"step {step}: {report.text()}")
        if self.health is not None and self.health.available and step % self.health_every == 0:
            rec.update(self.health.sample())
        return lines

    def should_stop(self) -> bool:
        """Whether any rank was asked to stop (SIGTERM); the same answer on every rank. A collective."""
        return self.preemption.should_stop()

    def close(self) -> None:
        self.preemption.uninstall()
        if self.watchdog is not None:
            self.watchdog.close()
        if self.health is not None:
            self.health.close()
        if self.lock is not None:
            self.lock.release()
