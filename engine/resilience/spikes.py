"""Loss-spike and non-finite loss detection, and the validated names of what to do about them.

Rule (Tukey's "far out" fence, robust to the outliers it looks for): over the last `window` accepted losses with
quartiles Q1 <= median <= Q3 and spread IQR = Q3 - Q1, a loss is a spike when

    loss > Q3 + factor x max(IQR, MIN_RELATIVE_SPREAD x |median|)

With the default factor 3 that is about 4.7 standard deviations above the median for Gaussian noise, and a handful
of earlier outliers in the window move neither quartile much. The quartiles of 50 losses are themselves noisy, so
the simulated false-alarm rate on flat noise (window 50) is about 2e-4 per step for Gaussian noise and 3e-3 for
heavy-tailed noise (Student t, 5 degrees of freedom), against 5e-3 and 2e-2 for a "median + 3 x 1.4826 x MAD"
(3 sigma) rule. The floor
keeps a near-constant history (tiny IQR) from flagging a rise of a fraction of a percent. Only rises count: a loss
below the fence, however far below, is accepted. A falling trend widens the IQR of the window a little, which only
makes detection more conservative.

Spikes and non-finite losses are kept out of the history, so one spike does not raise the fence for the next. The
flip side: a lasting jump to a higher level (a data mix change) is flagged at every step; `consecutive` counts the
flagged losses in a row so the caller can escalate (roll back or stop) instead of skipping forever.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Literal

NanPolicy = Literal["skip", "rollback", "stop"]
NAN_POLICIES: tuple[str, ...] = ("skip", "rollback", "stop")
MIN_RELATIVE_SPREAD = 0.01  # the IQR is taken as at least 1% of the median's magnitude


def check_nan_policy(value: str) -> str:
    """`value` when it is a known policy: "skip" (drop the step's update), "rollback" (reload the last checkpoint),
    "stop" (end the run); ValueError with one line otherwise."""
    if value not in NAN_POLICIES:
        raise ValueError(f"nan policy {value!r}: expected one of {', '.join(NAN_POLICIES)}")
    return value


class LossSpikeDetector:
    """Flags non-finite losses and upward spikes against a robust fence over the recent accepted losses.

    No spike is reported before `min_history` losses have been accepted (non-finite ones are always reported).
    """

    def __init__(self, window: int = 50, factor: float = 3.0, min_history: int = 10) -> None:
        if min_history < 4 or window < min_history:
            raise ValueError(f"loss spike window {window}, min_history {min_history}: need 4 <= min_history <= window")
        if factor <= 0:
            raise ValueError(f"loss spike factor {factor} must be positive")
        self.window = window
        self.factor = factor
        self.min_history = min_history
        self.history: deque[float] = deque(maxlen=window)
        self.spikes = 0
        self.nonfinite = 0
        self.consecutive = 0  # flagged losses in a row, reset by an accepted one
        self.last_step: int | None = None  # the step of the last flagged loss

    def limit(self) -> float | None:
        """The fence a loss must exceed to be a spike; None while the history is shorter than `min_history`."""
        if len(self.history) < self.min_history:
            return None
        q1, median, q3 = statistics.quantiles(self.history, n=4, method="inclusive")
        return q3 + self.factor * max(q3 - q1, MIN_RELATIVE_SPREAD * abs(median))

    def observe(self, step: int, loss: float) -> str | None:
        """None for an ordinary loss (added to the history); "nan" or "inf" for a non-finite one; a line starting
        with "spike" for a spike. Flagged losses are counted and not added to the history."""
        loss = float(loss)
        if math.isfinite(loss):
            fence = self.limit()
            if fence is None or loss <= fence:
                self.history.append(loss)
                self.consecutive = 0
                return None
            self.spikes += 1
            reason = f"spike: loss {loss:.4g} above {fence:.4g} (median {statistics.median(self.history):.4g})"
        else:
            self.nonfinite += 1
            reason = "nan" if math.isnan(loss) else "inf"
        self.consecutive += 1
        self.last_step = step
        return reason
