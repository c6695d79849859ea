"""Keeping a long run alive and honest: what stops, restarts or warns about a job before it wastes the machine.

    run_lock.py     one job per run directory (`RunDirLock`, an flock held for the job's life)
    preemption.py   SIGTERM as a flag that all ranks agree on, to save and exit between steps (`PreemptionHandler`)
    watchdog.py     a thread that dumps every thread's stack and exits when a step hangs (`HangWatchdog`)

Straggler detection, GPU health checks and loss-spike guards live alongside, in `stragglers.py`, `gpu_health.py`
and `spikes.py`. Names load on first use.
"""

from engine._lazy import lazy_exports

_EXPORTS = {
    "RunDirLock": "engine.resilience.run_lock",
    "RunDirLockedError": "engine.resilience.run_lock",
    "PreemptionHandler": "engine.resilience.preemption",
    "HangWatchdog": "engine.resilience.watchdog",
    "HangReport": "engine.resilience.watchdog",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
