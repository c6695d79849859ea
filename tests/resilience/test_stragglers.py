"""StragglerMonitor: percentile math on one process, and a slow rank named across two gloo processes."""

import math

import pytest

from engine.resilience.stragglers import StragglerMonitor, lower_median, percentile
from tests.distributed import run_distributed


def test_percentiles_match_linear_interpolation():
    xs = [float(v) for v in range(1, 101)]
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 90) == pytest.approx(90.1)
    assert percentile(xs, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert math.isnan(percentile([], 50))
    assert lower_median([4.0, 1.0, 3.0, 2.0]) == 2.0
    assert lower_median([math.nan, 5.0]) == 5.0


def test_single_process_report_every_n_steps_and_window_reset():
    mon = StragglerMonitor(every=4)
    for step, t in enumerate([0.1, 0.2, 0.3, 0.4], start=1):
        mon.record(t)
        rep = mon.report(step)
        assert (rep is None) == (step < 4)
    assert rep.p50 == [pytest.approx(0.25)] and rep.p90 == [pytest.approx(0.37)] and rep.maximum == [0.4]
    assert rep.stragglers == [] and rep.text() is None
    m = rep.metrics()
    assert m["straggler_count"] == 0 and m["slowest_rank"] == 0 and m["slowest_ratio"] == pytest.approx(1.0)
    mon.record(1.0)
    assert mon.report(8).maximum == [1.0]  # the window started afresh after step 4
    assert mon.report(12) is None  # nothing recorded anywhere


def test_report_names_ranks_above_threshold_slowest_first():
    p50s = [1.0, 2.0, 1.1, 1.6, 0.9, 3.0]
    mon = StragglerMonitor(every=1, threshold=1.5)
    mon._gather = lambda local: [[p, p, p] for p in p50s]  # six ranks without processes
    mon.record(1.0)
    got = mon.report(10)
    assert got.median_p50 == 1.1 and got.stragglers == [5, 1]  # 1.6 / 1.1 < 1.5
    assert got.metrics()["slowest_rank"] == 5 and got.metrics()["slowest_ratio"] == pytest.approx(3.0 / 1.1)
    assert "rank 5 2.73x, rank 1 1.82x" in got.text()


def _two_ranks(rank, world_size):
    import torch.distributed as dist

    mon = StragglerMonitor(every=5)
    base = [0.10, 0.11, 0.09, 0.10, 0.12]
    reports = []
    for step in range(1, 11):
        mon.record(base[(step - 1) % 5] * (3.0 if rank == 1 else 1.0))
        rep = mon.report(step)
        if rep is not None:
            reports.append((rep.stragglers, rep.p50, rep.metrics(), rep.text()))
    dist.barrier()
    return reports


@pytest.mark.distributed
def test_two_ranks_the_slow_one_is_named():
    results = run_distributed(_two_ranks, 2, timeout=120)
    assert results[0] == results[1]  # every rank sees the same report
    assert len(results[0]) == 2  # steps 5 and 10
    for stragglers, p50, metrics, text in results[0]:
        assert stragglers == [1]
        assert p50 == [pytest.approx(0.10), pytest.approx(0.30)]
        assert metrics["slowest_rank"] == 1 and metrics["straggler_count"] == 1
        assert metrics["slowest_ratio"] == pytest.approx(3.0)
        assert "rank 1 3.00x" in text
