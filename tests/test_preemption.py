"""Preemption handler: a real signal sets the flag; ranks agree to stop at the same step."""

from __future__ import annotations

import os
import signal

import pytest
from distributed import run_ranks

from mohge.train.preemption import PreemptionHandler


def test_signal_sets_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as handler:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.should_stop() and handler.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def _agree(rank, world):
    import torch.distributed as dist

    with PreemptionHandler() as handler:
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is signalled
        first = handler.should_stop(dist.group.WORLD), handler.signal_name, handler.exit_code
    with PreemptionHandler() as handler:  # Ctrl-C on one rank wins over a requeue signal on another
        os.kill(os.getpid(), signal.SIGTERM if rank == 0 else signal.SIGINT)
        return first, (handler.should_stop(dist.group.WORLD), handler.exit_code)


@pytest.mark.multirank
def test_all_ranks_stop_when_one_is_signalled():
    from mohge.train.preemption import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE

    assert run_ranks(2, _agree) == [((True, "peer signal", REQUEUE_EXIT_CODE), (True, INTERRUPT_EXIT_CODE)),
                                    ((True, "SIGTERM", REQUEUE_EXIT_CODE), (True, INTERRUPT_EXIT_CODE))]


def test_ctrl_c_stops_without_requeue_and_a_second_one_raises():
    from mohge.train.preemption import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE

    before = signal.getsignal(signal.SIGINT)
    with PreemptionHandler() as handler:
        assert handler.exit_code == REQUEUE_EXIT_CODE
        os.kill(os.getpid(), signal.SIGINT)
        assert handler.should_stop() and handler.interrupted and handler.signal_name == "SIGINT"
        assert handler.exit_code == INTERRUPT_EXIT_CODE
        os.kill(os.getpid(), signal.SIGINT)  # within a second: the same key press forwarded by torchrun
        handler._first_interrupt -= 2.0  # a second later
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_ignored_ctrl_c_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup or `cmd &` in a script
    try:
        with PreemptionHandler() as handler:
            os.kill(os.getpid(), signal.SIGINT)
            assert not handler.should_stop()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)

