"""LossSpikeDetector (the robust fence, non-finite losses, a history free of spikes) and check_nan_policy."""

import math
import random

import pytest

from engine.resilience.spikes import LossSpikeDetector, check_nan_policy


def noisy_losses(n=1000, seed=0):
    """A falling training curve with 2% multiplicative Gaussian noise."""
    rng = random.Random(seed)
    return [(2.0 + 6.0 * math.exp(-i / 150)) * (1 + 0.02 * rng.gauss(0, 1)) for i in range(n)]


def test_steady_noisy_losses_raise_no_spike():
    for seed in range(3):
        det = LossSpikeDetector()
        flagged = [(s, r) for s, loss in enumerate(noisy_losses(seed=seed)) if (r := det.observe(s, loss))]
        assert flagged == [] and det.spikes == det.nonfinite == 0


def test_injected_spike_detected_and_kept_out_of_the_history():
    det = LossSpikeDetector(window=50)
    losses = noisy_losses(300)
    for s, loss in enumerate(losses):
        assert det.observe(s, loss) is None
    before = list(det.history)
    fence = det.limit()
    reason = det.observe(300, 5 * losses[-1])
    assert reason.startswith("spike") and det.spikes == 1 and det.last_step == 300 and det.consecutive == 1
    assert list(det.history) == before and det.limit() == fence  # the spike did not move the fence
    assert det.observe(301, losses[-1]) is None and det.consecutive == 0
    assert det.observe(302, 0.1 * losses[-1]) is None  # a drop never counts
    assert det.history[-1] == pytest.approx(0.1 * losses[-1])


def test_nonfinite_losses_reported_from_the_first_step_and_not_kept():
    det = LossSpikeDetector()
    assert det.observe(0, float("nan")) == "nan"
    assert det.observe(1, float("inf")) == "inf" and det.observe(2, float("-inf")) == "inf"
    assert det.nonfinite == 3 and det.spikes == 0 and len(det.history) == 0 and det.consecutive == 3


def test_no_spike_before_min_history_and_a_flat_history_has_a_floor():
    det = LossSpikeDetector(min_history=10)
    for s in range(9):
        assert det.observe(s, 1.0) is None
    assert det.limit() is None and det.observe(9, 100.0) is None  # the 10th loss is accepted unjudged
    det = LossSpikeDetector(min_history=10)
    for s in range(10):
        det.observe(s, 2.0)
    assert det.limit() == pytest.approx(2.0 + 3 * 0.02)  # IQR 0: the 1%-of-median floor
    assert det.observe(10, 2.05) is None and det.observe(11, 2.07).startswith("spike")


def test_fence_is_the_upper_quartile_plus_factor_iqr():
    det = LossSpikeDetector(window=12, factor=3.0, min_history=12)
    for s in range(12):
        det.observe(s, float(s + 1))  # 1..12: Q1 3.75, Q3 9.25 (linear interpolation), IQR 5.5
    assert det.limit() == pytest.approx(9.25 + 3 * 5.5)
    assert det.observe(12, 25.8).startswith("spike")
    assert det.observe(13, 25.7) is None


def test_check_nan_policy():
    for name in ("skip", "rollback", "stop"):
        assert check_nan_policy(name) == name
    with pytest.raises(ValueError, match="expected one of skip, rollback, stop") as e:
        check_nan_policy("ignore")
    assert "\n" not in str(e.value)
