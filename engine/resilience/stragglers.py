"""Straggler detection: which ranks' step times run slower than the rest, from each rank's own timings.

In synchronous data parallelism every rank waits for the slowest at each collective, so a slow GPU, a throttled
node or a noisy neighbour costs the whole job without showing up in the global step time of any one rank. Each rank
records its step times (time spent in its own compute, ideally excluding the wait in the gradient all-reduce; the
wall time of a whole step is equal across ranks and hides the culprit); every `every` steps the ranks exchange their
p50/p90/max with one `all_gather` of three floats, and a rank whose p50 exceeds `threshold` x the median p50 is named.

The median is the lower median (the smaller middle value for an even count), so with two ranks the slow one is
compared with the fast one rather than with their mean, and a few slow ranks cannot drag the reference up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `values` with linear interpolation between ranks (numpy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def lower_median(values: list[float]) -> float:
    """The lower median of the finite `values` (NaN when there are none)."""
    xs = sorted(v for v in values if math.isfinite(v))
    return xs[(len(xs) - 1) // 2] if xs else math.nan


@dataclass
class StragglerReport:
    """Every rank's step-time percentiles over one window, in seconds (NaN for a rank that recorded nothing)."""

    step: int
    p50: list[float]
    p90: list[float]
    maximum: list[float]
    median_p50: float
    threshold: float
    stragglers: list[int]  # ranks whose p50 > threshold x median_p50, slowest first

    def ratio(self, rank: int) -> float:
        """`rank`'s p50 over the median p50."""
        return self.p50[rank] / self.median_p50 if self.median_p50 > 0 else math.nan

    def metrics(self) -> dict[str, Any]:
        """Scalars for the metrics logger: the slowest rank by p50 and how far it is from the median."""
        finite = [r for r, v in enumerate(self.p50) if math.isfinite(v)]
        slowest = max(finite, key=lambda r: self.p50[r])
        return {
            "step_time_p50_median": self.median_p50,
            "step_time_p50_max": self.p50[slowest],
            "step_time_p90_max": max(self.p90[r] for r in finite),
            "step_time_max": max(self.maximum[r] for r in finite),
            "straggler_count": len(self.stragglers),
            "slowest_rank": slowest,
            "slowest_ratio": self.ratio(slowest),
        }

    def text(self) -> str | None:
        """One line naming the slow ranks and their ratio to the median p50; None when there are none."""
        if not self.stragglers:
            return None
        ranks = ", ".join(f"rank {r} {self.ratio(r):.2f}x" for r in self.stragglers)
        return (
            f"stragglers at step {self.step}: {ranks} the median p50 step time ({self.median_p50:.3f} s, "
            f"threshold {self.threshold:g}x)"
        )


class StragglerMonitor:
    """Collects this rank's step times and, every `every` steps, compares all ranks' percentiles.

    `report(step)` is a collective when distributed: every rank of `group` (default: the whole job) must call it at
    the same steps, or the ranks that did hang in the all_gather. Calling it after every step on every rank is the
    intended use; it only communicates when `step % every == 0`. The window of recorded times starts afresh after
    each report.
    """

    def __init__(self, every: int, threshold: float = 1.5, group: dist.ProcessGroup | None = None) -> None:
        if every < 1:
            raise ValueError(f"straggler check every {every} steps: must be at least 1")
        if threshold <= 1.0:
            raise ValueError(f"straggler threshold {threshold} must be above 1 (a ratio to the median p50)")
        self.every = every
        self.threshold = threshold
        self.group = group
        self._times: list[float] = []

    def record(self, step_time_s: float) -> None:
        """Adds one step's time in seconds to the window."""
        self._times.append(float(step_time_s))

    def _local(self) -> list[float]:
        return [percentile(self._times, 50), percentile(self._times, 90), max(self._times, default=math.nan)]

    def _gather(self, local: list[float]) -> list[list[float]]:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.group) == 1:
            return [local]
        # NCCL only moves CUDA tensors; gloo (and the rest) take CPU ones.
        on_cuda = dist.get_backend(self.group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
        mine = torch.tensor(local, dtype=torch.float64, device=device)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, mine, group=self.group)
        return [p.tolist() for p in parts]

    def report(self, step: int) -> StragglerReport | None:
        """The ranks' percentiles when `step` is a multiple of `every` (None otherwise, or when no rank recorded a
        time). Ranks are numbered within `group`. Collective when distributed: see the class docstring."""
        if step % self.every != 0:
            return None
        rows = self._gather(self._local())
        self._times = []
        p50, p90, mx = (list(col) for col in zip(*rows))
        median = lower_median(p50)
        if not math.isfinite(median):
            return None
        slow = [r for r, v in enumerate(p50) if median > 0 and v > self.threshold * median]
        slow.sort(key=lambda r: -p50[r])
        return StragglerReport(step, p50, p90, mx, median, self.threshold, slow)
