"""Every user mistake is one of these; `run_tool` turns them into one `mohge-<tool>: ...` line.

Message convention: `<field or file>: <problem>; <fix>`. The CLI prefixes the tool and the kind:
`mohge-train: config error: train.lr: must be > 0 (got -1.0); use a positive learning rate`.
Every rank exits with EXIT_USER_ERROR; rank 0 prints the line (other ranks only for errors that
can differ between ranks, prefixed with their rank). No torch import here: every layer can use it.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from typing import Callable, Optional

EXIT_USER_ERROR = 2
RANK0_GRACE_S = 5.0  # under torchrun, how long other ranks leave rank 0 to print a shared error


class MohgeError(Exception):
    """A mistake the user can fix; `kind` names the category in the printed line."""

    kind = "usage"
    same_on_every_rank = False  # True: rank 0's line says it all


class ConfigError(MohgeError, ValueError):
    """A config value that cannot work; the message names the field and the fix."""

    kind = "config"
    same_on_every_rank = True


class DataError(MohgeError, ValueError):
    """Unusable data (missing corpus, tokenizer that does not fit); the message names the file."""

    kind = "data"


class CheckpointError(MohgeError, RuntimeError):
    """A checkpoint that cannot be used; the message names the path and what is wrong."""

    kind = "checkpoint"


class DivergenceError(MohgeError, RuntimeError):
    """Too many consecutive skipped (non-finite or spiking) steps; the message names the checkpoint
    kept to resume from. Exit code 3: the run stopped itself, the input was not wrong."""

    kind = "training"
    same_on_every_rank = True
    exit_code = 3


class Interrupted(MohgeError):
    """Ctrl-C (KeyboardInterrupt) outside the training loop's own stop path, or a second Ctrl-C;
    the message says what was saved. Exit code 130, as a shell gives an interrupted command."""

    kind = "interrupted"
    same_on_every_rank = True
    exit_code = 130


class UsageError(MohgeError, ValueError):
    """A bad command-line argument of a tool (not a config field)."""

    kind = "usage"
    same_on_every_rank = True


def hide_megatron_notices() -> None:
    """megatron-core's import-time notices about optional kernels mohge does not use (Transformer
    Engine, Apex): printed once per process otherwise, before a tool's own output."""
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def error_line(tool: str, err: BaseException) -> str:
    """The one line a user sees for `err`."""
    if isinstance(err, Interrupted):
        return f"mohge-{tool}: interrupted: {err}"
    if isinstance(err, MohgeError):
        return f"mohge-{tool}: {err.kind} error: {err}"
    if isinstance(err, OSError):  # out_dir not writable, disk full, missing input file
        where = err.filename or "output"
        hint = {errno.ENOSPC: "free space or choose another out_dir",
                errno.EACCES: "choose a writable path (out_dir=...)",
                errno.EROFS: "choose a writable path (out_dir=...)",
                errno.ENOENT: "check the path"}.get(err.errno or 0, "check the path and its permissions")
        return f"mohge-{tool}: I/O error: {where}: {err.strerror or err}; {hint}"
    return f"mohge-{tool}: error: {err}"


def report(tool: str, err: BaseException) -> int:
    """Prints `err` as one line (rank 0, or any rank for rank-specific errors); returns the exit code."""
    rank, code = _rank(), getattr(err, "exit_code", EXIT_USER_ERROR)
    line = error_line(tool, err)
    if rank == 0:
        print(line, file=sys.stderr, flush=True)
    elif not getattr(err, "same_on_every_rank", False):
        print(f"[rank {rank}] {line}", file=sys.stderr, flush=True)
    elif os.environ.get("TORCHELASTIC_RUN_ID") and code == EXIT_USER_ERROR:
        # torchrun stops every worker as soon as one exits: a rank that got here before rank 0
        # would have rank 0 killed before it prints the line. Rank 0's exit ends this wait.
        time.sleep(RANK0_GRACE_S)
    return code


def run_tool(tool: str, fn: Callable[[], Optional[int]]) -> int:
    """Runs a CLI body: user mistakes (MohgeError, OSError) become one line and exit code 2;
    Ctrl-C becomes one line and exit code 130 (never a traceback)."""
    try:
        return fn() or 0
    except KeyboardInterrupt:
        return report(tool, Interrupted("stopped by Ctrl-C; what it was writing may be incomplete"))
    except BrokenPipeError:  # `mohge-train --print-config | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (MohgeError, OSError) as err:
        return report(tool, err)
