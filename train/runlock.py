"""One running job per out_dir: `<out_dir>/.lock`, held with flock(2) by rank 0 for the run.

The kernel drops an flock when its holder dies, even by kill -9, so a lock left by a dead job
never blocks the next one; the file's text (pid, host, start time) only names the holder in the
refusal. A lock file whose pid is dead on this host is recovered the same way. Re-entrant inside
one process (tests and notebooks build several Trainers on one out_dir), which is why this
module keeps the per-process table `_HELD`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from mohge.model.config import ConfigError

LOCK = ".lock"
_HELD: dict[str, list] = {}  # realpath of the lock -> [fd, users]; this process's locks only


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']} since {when}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class RunLock:
    """Holds `<out_dir>/.lock` until release() (or this process ends)."""

    def __init__(self, out_dir: str):
        self.path = Path(out_dir) / LOCK
        self.key: Optional[str] = None

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            key = os.path.realpath(self.path)
            if key in _HELD:
                _HELD[key][1] += 1
                self.key = key
                return self
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(f"out_dir: {self.path.parent} is not writable ({err.strerror}); "
                              "choose another out_dir or fix its permissions") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"out_dir: {self.path.parent} is in use by another run ({_holder(self.path)}); wait "
                              f"for it to finish, stop it, or choose another out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        _HELD[key] = [fd, 1]
        self.key = key
        return self

    def release(self) -> None:
        if self.key is None or self.key not in _HELD:
            return
        entry = _HELD[self.key]
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self.key]
            os.ftruncate(entry[0], 0)
            os.close(entry[0])  # closing the last descriptor drops the flock
        self.key = None


def acquire_run_lock(out_dir: str, is_rank0: bool, device: Optional[torch.device] = None) -> Optional[RunLock]:
    """Rank 0 takes the lock; every rank learns the outcome, so all stop together on refusal."""
    lock, error = None, None
    if is_rank0:
        try:
            lock = RunLock(out_dir).acquire()
        except ConfigError as err:
            error = err
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1.0 if error else 0.0], device=device or "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and error is None:
            raise ConfigError(f"out_dir: {out_dir} is in use by another run (rank 0 could not lock it)")
    if error is not None:
        raise error
    return lock
