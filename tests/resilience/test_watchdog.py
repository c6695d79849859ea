"""HangWatchdog: a step past its timeout fires with every thread's stack on file, steps within it never do, the
timeout follows the median step time, and without `on_fire` a hung process exits with the exit code."""

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from engine.resilience.watchdog import HangWatchdog

ROOT = Path(__file__).resolve().parents[2]


class Fired:
    def __init__(self):
        self.reports = []
        self.event = threading.Event()

    def __call__(self, report):
        self.reports.append(report)
        self.event.set()


def _hanging_step_function(until: threading.Event):
    """A step that hangs until the watchdog fires (so a slow machine cannot finish it first)."""
    assert until.wait(10), "the watchdog did not fire"


def test_a_step_past_its_timeout_fires_and_dumps_all_stacks(tmp_path, capfd):
    fired = Fired()
    with HangWatchdog(tmp_path / "hangs", rank=3, first_timeout_s=0.2, on_fire=fired) as dog:
        with dog.step(step=41):
            _hanging_step_function(fired.event)
    (report,) = fired.reports
    assert (report.rank, report.step, report.label, report.timeout_s) == (3, 41, "step", 0.2)
    assert 0.2 <= report.elapsed_s < 5
    assert report.path == tmp_path / "hangs" / "hang_rank00003.txt"
    text = report.path.read_text()
    assert text.startswith("hang watchdog: rank 3, step 41, elapsed 0.")
    assert "Thread" in text and "_hanging_step_function" in text
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(report.path) in err[0]


def test_steps_within_their_timeout_never_fire(tmp_path):
    fired = Fired()
    with HangWatchdog(tmp_path, first_timeout_s=0.5, min_timeout_s=0.5, warmup_steps=2, on_fire=fired) as dog:
        for _ in range(8):
            with dog.step():
                time.sleep(0.02)
        time.sleep(0.6)  # between steps nothing is watched
    assert not fired.reports and not (tmp_path / "hang_rank00000.txt").exists()


def test_timeout_follows_the_median_step_time(tmp_path):
    with HangWatchdog(tmp_path, min_timeout_s=0.5, factor=4, warmup_steps=3, first_timeout_s=100, history=5) as dog:
        for seconds, expected in [(0.1, 100), (50.0, 100), (0.3, 4 * 0.3), (0.2, 4 * 0.25), (0.1, 4 * 0.2)]:
            dog.step_started()
            dog.step_finished(seconds)
            assert dog.timeout_s == pytest.approx(expected)
        for _ in range(5):  # the window of 5 now holds only these: the floor applies
            dog.step_started()
            dog.step_finished(0.01)
        assert dog.timeout_s == 0.5


def test_suspended_time_does_not_count_and_a_phase_has_its_own_timeout(tmp_path):
    fired = Fired()
    with HangWatchdog(tmp_path, first_timeout_s=0.5, on_fire=fired) as dog:
        with dog.step(step=7):
            time.sleep(0.1)
            with dog.suspended():  # a checkpoint save inside the step
                time.sleep(0.6)
            time.sleep(0.1)
        assert not fired.reports
        with dog.phase("evaluation", timeout_s=0.1):
            _hanging_step_function(fired.event)
    (report,) = fired.reports
    assert (report.label, report.step, report.timeout_s) == ("evaluation", 7, 0.1)
    assert "evaluation (last step 7)" in report.path.read_text()


def test_a_hung_process_exits_with_the_exit_code(tmp_path):
    script = textwrap.dedent(
        f"""
        import time
        from engine.resilience.watchdog import HangWatchdog

        def hang_in_a_collective():
            time.sleep(60)

        dog = HangWatchdog({str(tmp_path)!r}, rank=1, first_timeout_s=0.5, exit_code=3)
        with dog.step():
            hang_in_a_collective()
        """
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 3, proc.stderr
    assert elapsed < 0.5 + 3.0
    dump = (tmp_path / "hang_rank00001.txt").read_text()
    assert "hang_in_a_collective" in dump and "rank 1, step 0" in dump
    assert "hang_rank00001.txt" in proc.stderr
