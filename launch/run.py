"""torchrun without the failure block for exits the project already explained on one line.

`python -m mohge.launch.run [torchrun args] -m mohge.train.cli ...` is torchrun (same arguments,
same behaviour) except at the end: when every failed worker exited with 2 (a user error, already
printed by rank 0 as `mohge-train: ...`) or 75 (a preemption checkpoint, the scheduler requeues),
it exits with that code after at most one line instead of torchrun's ChildFailedError block.
Other failures (crashes) keep one summary line per failed rank; their tracebacks are above it.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Optional

EXIT_USER_ERROR = 2
EXIT_REQUEUE = 75  # train/preemption.py REQUEUE_EXIT_CODE
QUIET_EXITS = (EXIT_USER_ERROR, EXIT_REQUEUE)


class _DropExplainedExits(logging.Filter):
    """Drops the agent's `failed (exitcode: 2)` / `(exitcode: 75)`, `closing signal` and `death signal` records."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return (not any(f"exitcode: {code})" in message for code in QUIET_EXITS) and "closing signal" not in message
                and "death signal, shutting down workers" not in message)  # Ctrl-C / SIGTERM: one line of ours


def summarize(failures: dict, root_rank: int) -> tuple[int, list[str]]:
    """(exit code, lines to print) from torchrun's {rank: ProcessFailure} and the first failed rank.
    Workers the agent terminated (SIGTERM) after the first failure are not failures of their own."""
    root = failures[root_rank].exitcode
    own = {r: f for r, f in failures.items() if r == root_rank or f.exitcode != -signal.SIGTERM}
    codes = {f.exitcode for f in own.values()}
    if root == EXIT_USER_ERROR and codes <= set(QUIET_EXITS):
        return EXIT_USER_ERROR, []
    if root == EXIT_REQUEUE and codes <= set(QUIET_EXITS):
        return EXIT_REQUEUE, [f"mohge-train: stopped for preemption after saving a checkpoint; exit {EXIT_REQUEUE} "
                              "asks the scheduler to requeue (checkpoint.resume=auto continues)"]
    lines = [f"mohge-train: rank {rank} exited with code {f.exitcode}"
             + (f" ({f.signal_name()})" if f.exitcode < 0 else "") + "; its error is printed above"
             for rank, f in sorted(own.items()) if f.exitcode not in QUIET_EXITS]
    return (root if 0 < root < 256 else 1), lines


def main(argv: Optional[list[str]] = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for name in ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api"):
        logging.getLogger(name).addFilter(_DropExplainedExits())
    from torch.distributed.elastic.multiprocessing.api import SignalException

    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        torchrun.run(args)
    except SignalException as err:  # the agent passed the signal on to the workers, which said what they saved
        sig = signal.Signals(err.sigval)
        what = "Ctrl-C" if sig == signal.SIGINT else sig.name
        print(f"mohge-train: the job was stopped by {what}; the workers' lines above say what was saved "
              "(resume with checkpoint.resume=auto)", file=sys.stderr, flush=True)
        return 128 + sig.value
    except ChildFailedError as err:
        code, lines = summarize(err.failures, err.get_first_failure()[0])
        for line in lines:
            print(line, file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
