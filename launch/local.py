"""Runs a function on N gloo processes on this machine and collects each rank's return value.

For tests and CPU benchmarks of parallel code; real jobs launch through torchrun (launch/).
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, queue) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        # Plain pickle bytes: tensors sent through the queue as shared memory would vanish when
        # this process exits before the parent reads them.
        queue.put((rank, pickle.dumps(fn(rank, world, *args)), None))
    except BaseException:  # report to the parent instead of hanging it
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn, *args, timeout: float = 120.0) -> list:
    """fn(rank, world, *args) on `world` processes; returns [result of rank 0, rank 1, ...]."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = [None] * world, []
    try:
        for _ in range(world):
            rank, value, err = queue.get(timeout=timeout)
            results[rank] = pickle.loads(value) if value is not None else None
            if err:
                errors.append(f"rank {rank}:\n{err}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.terminate()
    if errors:
        raise AssertionError("\n".join(errors))
    return results
