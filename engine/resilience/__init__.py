"""Keeping a long run alive and honest: what stops, restarts or warns about a job before it wastes the machine.

    run_lock.py     one job per run directory (`RunDirLock`, an flock held for the job's life)
    preemption.py   SIGTERM as a flag that all ranks agree on, to save and exit between steps (`PreemptionHandler`)
    watchdog.py     a thread that dumps every thread's stack and exits when a step hangs (`HangWatchdog`)
    stragglers.py   per-rank step-time percentiles gathered every N steps, slow ranks named (`StragglerMonitor`)
    gpu_health.py   NVML memory, temperature, power, throttle reasons, ECC and XID errors (`GpuHealth`)
    spikes.py       non-finite losses and loss spikes against a robust running fence (`LossSpikeDetector`)

`engine.training.guards.RunGuards` wires them into the training loop from `[resilience]`. Names load on first use.
"""

from engine._lazy import lazy_exports

_EXPORTS = {
    "RunDirLock": "engine.resilience.run_lock",
    "RunDirLockedError": "engine.resilience.run_lock",
    "PreemptionHandler": "engine.resilience.preemption",
    "HangWatchdog": "engine.resilience.watchdog",
    "HangReport": "engine.resilience.watchdog",
    "StragglerMonitor": "engine.resilience.stragglers",
    "StragglerReport": "engine.resilience.stragglers",
    "GpuHealth": "engine.resilience.gpu_health",
    "LossSpikeDetector": "engine.resilience.spikes",
    "check_nan_policy": "engine.resilience.spikes",
    "NAN_POLICIES": "engine.resilience.spikes",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
