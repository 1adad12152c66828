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
        return handler.should_stop(dist.group.WORLD), handler.signal_name


@pytest.mark.multirank
def test_all_ranks_stop_when_one_is_signalled():
    assert run_ranks(2, _agree) == [(True, "peer signal"), (True, "SIGTERM")]
