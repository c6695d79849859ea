"""PreemptionHandler: SIGTERM only sets a flag, uninstall restores the old handler, and ranks agree on stopping."""

import os
import signal
import threading
import warnings

import pytest

from engine.resilience.preemption import PreemptionHandler
from tests.distributed import run_distributed


def test_sigterm_sets_the_flag_and_uninstall_restores_the_previous_handler():
    seen = []

    def previous(signum, frame):
        seen.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with PreemptionHandler() as handler:
            assert handler.installed and not handler.requested and not handler.should_stop()
            os.kill(os.getpid(), signal.SIGTERM)  # delivered before the next bytecode: still alive afterwards
            assert handler.requested and handler.should_stop()
            assert handler.signal_received == signal.SIGTERM and seen == []
        assert signal.getsignal(signal.SIGTERM) is previous and not handler.installed
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_other_signals_and_default_restored():
    handler = PreemptionHandler(signals=(signal.SIGUSR1,)).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.requested and handler.signal_received == signal.SIGUSR1
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_install_from_another_thread_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    out = {}

    def install():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["handler"] = PreemptionHandler().install()
            out["warnings"] = [str(w.message) for w in caught]

    thread = threading.Thread(target=install)
    thread.start()
    thread.join()
    handler = out["handler"]
    assert not handler.installed and not handler.requested and not handler.should_stop()
    assert any("main thread" in w for w in out["warnings"])
    assert signal.getsignal(signal.SIGTERM) is before
    handler.uninstall()  # nothing to restore: a no-op


def _agree(rank, world_size):
    with PreemptionHandler() as handler:
        before = handler.should_stop()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return before, handler.requested, handler.should_stop()


@pytest.mark.distributed
def test_one_rank_signalled_all_ranks_stop():
    (before0, local0, stop0), (before1, local1, stop1) = run_distributed(_agree, 2, timeout=120)
    assert (before0, before1) == (False, False)
    assert (local0, local1) == (False, True)
    assert (stop0, stop1) == (True, True)
