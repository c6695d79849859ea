"""Pipeline parallelism: schedules as data (schedules.py), a simulator that checks them (simulate.py), stage
splitting (stages.py), the runner that executes a rank's actions (runner.py) and the split backward of zero-bubble
schedules (deferred.py).

Names load on first use.
"""

from engine._lazy import lazy_exports

_EXPORTS = {
    "Action": "engine.parallel.pipeline.schedules",
    "SCHEDULES": "engine.parallel.pipeline.schedules",
    "build_schedule": "engine.parallel.pipeline.schedules",
    "check_schedule": "engine.parallel.pipeline.schedules",
    "simulate": "engine.parallel.pipeline.simulate",
    "DeadlockError": "engine.parallel.pipeline.simulate",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
