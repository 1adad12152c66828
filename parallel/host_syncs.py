"""Counting host-device syncs on any device, CPU included.

torch.cuda.set_sync_debug_mode only exists on CUDA, so this counts the operations that make the
host wait for device values, as they pass the dispatcher: reading a value to the host (`.item()`,
`int(t)`, `.tolist()`) and ops whose output size depends on the data (nonzero, boolean indexing,
masked_select, unique, bincount, repeat_interleave without `output_size`). Forward and backward
both pass through it (CPU autograd runs in the calling thread). Used by the no-sync tests and by
bench/bench_moe.py.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_ALWAYS = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
    aten.nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.is_nonzero.default,
}
_TOLIST = torch.Tensor.tolist
_REPEAT_INTERLEAVE = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}


def _is_sync(func, args, kwargs) -> bool:
    if func in _ALWAYS:
        return True
    if func in _REPEAT_INTERLEAVE:
        return kwargs.get("output_size") is None
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
        return any(i is not None and i.dtype == torch.bool for i in indices)
    return False


class _SyncCounter(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self.counts[str(func)] += 1
        return func(*args, **kwargs)


def read_on_host(t: torch.Tensor) -> list:
    """`t.tolist()` for a kernel reading its own input (offsets) where it lives. On the CPU there is
    no device to wait for, as in torch's CPU grouped_mm, so it is not counted; on any other device
    it is a host sync and counted like every `.tolist()`."""
    return _TOLIST(t) if t.device.type == "cpu" else t.tolist()


@contextmanager
def count_host_syncs():
    """Yields a Counter {op name: times} of the syncing ops run inside the block
    (`.tolist()` counted once per call: it does not pass the dispatcher)."""
    counts: Counter = Counter()
    original = torch.Tensor.tolist

    def tolist(self):
        counts["Tensor.tolist"] += 1
        return original(self)

    torch.Tensor.tolist = tolist
    try:
        with _SyncCounter(counts):
            yield counts
    finally:
        torch.Tensor.tolist = original
