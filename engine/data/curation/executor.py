"""Runs one stage's shard tasks: in this process (one worker) or over a local process pool, with a progress bar.

An executor is anything with `run(fn, tasks, desc)` that calls `fn(*task)` for every task and yields the results as
they complete; another backend (a cluster scheduler, Ray) plugs in by providing the same method, since every task
reads and writes only files under the run's directory.
"""

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from tqdm import tqdm


class ShardExecutor(Protocol):
    def run(self, fn: Callable[..., Any], tasks: Sequence[tuple], desc: str) -> Iterator[Any]: ...


class WorkerDied(RuntimeError):
    """A pool worker ended without a result (killed, out of memory); finished shards keep their markers."""


class LocalExecutor:
    """`workers` processes (1: this process, no pool); a tqdm bar per stage unless `progress` is False."""

    def __init__(self, workers: int = 1, progress: bool = True):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.progress = progress

    def run(self, fn: Callable[..., Any], tasks: Sequence[tuple], desc: str) -> Iterator[Any]:
        with tqdm(total=len(tasks), desc=desc, unit="file", disable=not self.progress or not tasks) as bar:
            if self.workers == 1 or len(tasks) <= 1:
                for task in tasks:
                    yield fn(*task)
                    bar.update()
                return
            pool = ProcessPoolExecutor(max_workers=min(self.workers, len(tasks)))
            try:
                running = {pool.submit(fn, *task) for task in tasks}
                while running:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
                        bar.update()
            except BrokenProcessPool:
                message = f"{desc}: a worker process died; finished files are kept, run again to resume"
                raise WorkerDied(message) from None
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
