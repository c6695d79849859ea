"""Runs a stage's shard tasks on a Ray cluster (Moritz et al. 2018, "Ray: A Distributed Framework for Emerging AI
Applications", OSDI), for curation on more than one machine: `--executor ray [--ray-address ADDR]`.

Each shard of a per-file stage is one Ray task running the same function the local pool runs; the stages, markers
and resume rule are the runner's (stages.py), so finished shards are not redone whichever executor ran them. The
global stage runs in the driver. Every task reads and writes files only, so the inputs and the output directory must
be on a file system every node sees at the same path, and every node needs this project installed. A task whose
worker or node dies is retried by Ray (its default, 3 times: a shard without its marker is redone from scratch, so a
retry is safe); if it still fails the run stops with `WorkerDied`, finished shards kept.

`ray` is an optional dependency (`pip install -e '.[ray]'`), imported only when a run starts.
"""

import importlib.util
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tqdm import tqdm

from engine.data.curation.executor import WorkerDied
from engine.data.curation.steps import CurationError

NEEDS_RAY = "the ray executor needs the ray package: pip install -e '.[ray]'"


class RayExecutor:
    """Shard tasks as Ray tasks of `cpus_per_task` CPUs each. `address`: the cluster to join (`auto`: the one
    `ray start` started on this machine; `ray://host:10001`: a remote one), or None to use the Ray instance this
    process already initialised, else to start a local one. A Ray instance it starts lives until the process ends
    (or `ray.shutdown()`), so the stages of a run share it."""

    def __init__(self, address: str | None = None, progress: bool = True, cpus_per_task: float = 1.0):
        if importlib.util.find_spec("ray") is None:
            raise CurationError(NEEDS_RAY)
        if cpus_per_task <= 0:
            raise ValueError(f"cpus_per_task must be > 0, got {cpus_per_task}")
        self.address = address
        self.progress = progress
        self.cpus_per_task = cpus_per_task

    def _ray(self) -> Any:
        import ray  # optional and heavy: imported when a stage runs, never by `import engine`

        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            except ConnectionError as e:  # no cluster at that address
                raise CurationError(f"cannot join the Ray cluster at {self.address}: {e}") from None
        return ray

    def run(self, fn: Callable[..., Any], tasks: Sequence[tuple], desc: str) -> Iterator[Any]:
        if not tasks:
            return
        ray = self._ray()
        remote = ray.remote(num_cpus=self.cpus_per_task)(fn)
        pending = [remote.remote(*task) for task in tasks]
        with tqdm(total=len(tasks), desc=desc, unit="file", disable=not self.progress) as bar:
            try:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    yield ray.get(done[0])
                    bar.update()
            except ray.exceptions.RayTaskError as e:  # the shard function raised: re-raise its own exception
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, Exception) else e) from None
            except ray.exceptions.RayError as e:  # a worker or node died and Ray's retries did not save it
                message = f"{desc}: a Ray task failed ({type(e).__name__}); finished files are kept, run again"
                raise WorkerDied(message + " to resume") from None
            finally:
                for ref in pending:
                    ray.cancel(ref)
