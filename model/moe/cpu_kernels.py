"""The ragged expert ops' CPU kernels in C++ (model/moe/ragged_cpu.cpp), built on first use.

The Python kernels of model/moe/ragged_mm.py issue one mm per expert from Python; the C++ ones run
the same loop without the interpreter in between (the difference is measured in bench/bench_moe.py,
docs/performance.md). torch's extension builder compiles the file once per machine (20-45 s
on 2 cores; needs a C++ compiler, as torch.compile's CPU backend does, and ninja, which the
`ninja` wheel among the dependencies brings), into $TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions) under a name that hashes the source, torch's version, the flags and
the architecture, so an edited file or another torch builds anew and every later process only
loads the library. One line on stderr says when it builds; builds are serialised by an OS file
lock (several ranks, a build killed by SIGKILL before: the next one takes over).

MOHGE_CPU_KERNELS=python keeps the Python kernels (same results); where the build fails, they
run after one warning that names the reason (unless MOHGE_CPU_KERNELS=cpp asked for the C++ ones
by name: then the failure is an error; mohge-train builds them before the model then).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from mohge.train.errors import UsageError

SOURCE = Path(__file__).with_name("ragged_cpu.cpp")
FLAGS = ["-O3"]
CHOICES = ("cpp", "python")


def choice() -> str:
    value = os.environ.get("MOHGE_CPU_KERNELS", "cpp")
    if value not in CHOICES:
        # A user error: mohge-train prints it as one line, not a traceback from inside the first step.
        raise UsageError(f"MOHGE_CPU_KERNELS={value!r}: use one of {', '.join(CHOICES)} (or leave it unset: cpp)")
    return value


def check() -> None:
    """At a tool's start: refuses a bad MOHGE_CPU_KERNELS, and builds the C++ kernels when they were
    asked for by name (a failed build stops the tool there, before any model is built)."""
    if choice() == "cpp" and _named():
        ops()


def _named() -> bool:
    return os.environ.get("MOHGE_CPU_KERNELS") == "cpp"


@functools.cache
def ops():
    """torch.ops.mohge_cpu (ragged_mm, ragged_mm_wgrad, ragged_swiglu, ragged_swiglu_backward), or
    None: the Python kernels run (MOHGE_CPU_KERNELS=python, or the build failed)."""
    if choice() == "python":
        return None
    try:
        _load()
    except Exception as err:  # no compiler, no ninja, a read-only cache...: the Python loop still works
        reason = _reason(err)
        if _named():  # asked for by name: not silently something else
            raise UsageError(f"MOHGE_CPU_KERNELS=cpp: the C++ CPU expert kernels could not be built ({reason}); "
                             "install a C++ compiler, or unset MOHGE_CPU_KERNELS to run the Python kernels "
                             "after a warning") from err
        warnings.warn(f"mohge: the C++ CPU expert kernels ({SOURCE.name}) could not be built ({reason}); "
                      "the Python kernels run instead (same results, slower). MOHGE_CPU_KERNELS=python "
                      "selects them without trying.", RuntimeWarning, stacklevel=2)
        return None
    return torch.ops.mohge_cpu


def _reason(err: Exception) -> str:
    """Why the build failed, in one line. torch's message for a failed ninja build starts with the
    whole compile command; the compiler's (or the shell's) error line further down says why."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if not lines[0].startswith("Error building extension") or len(lines) == 1:
        return lines[0][:300]
    log = [line for line in lines[1:] if not line.startswith(("[", "FAILED:", "ninja:")) and " -MMD " not in line]
    cause = next((line for line in log if "error" in line.lower() or "not found" in line), log[0] if log else "")
    return f"the build failed: {cause[:300]}" if cause else lines[0][:300]


def build_dir() -> Path:
    """Where the library is built: its name hashes the source, torch's version, the flags and the
    machine's architecture (a home directory shared by x86 and aarch64 nodes, whose torch can have
    one version string)."""
    key = f"{torch.__version__} {' '.join(FLAGS)} {platform.machine()} {sys.platform}".encode()
    digest = hashlib.sha256(SOURCE.read_bytes() + key)
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return root / f"mohge_ragged_cpu_{digest.hexdigest()[:12]}"


def _load() -> None:
    build = build_dir()
    name = build.name
    library, built = build / f"{name}.so", build / "built"
    # Built before (`built` is written once the library is complete): load it, no lock taken, so a
    # read-only cache works.
    if library.exists() and built.exists():
        torch.ops.load_library(str(library))
        return
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # the ninja wheel's binary sits beside the interpreter's scripts
        import ninja

        if ninja.BIN_DIR:  # "" where the wheel's binary is not found either: torch's check names it
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    build.mkdir(parents=True, exist_ok=True)
    # One builder at a time (the ranks of a run, several runs) under an OS lock, which the kernel
    # drops when its holder dies, even by SIGKILL. torch's own lock file (`lock`) stays behind after
    # a killed build and makes every later build wait for it forever: holding ours, any such file
    # is stale.
    # A build that failed while this process waited (another rank's) is not tried again: the ranks
    # of a run would otherwise each fail in turn; a later run tries anew.
    failed, waiting_since = build / "failed", time.time()
    with open(build / "build.lock", "a") as held:
        import fcntl  # POSIX; elsewhere the import fails and the Python kernels run after the warning

        fcntl.flock(held, fcntl.LOCK_EX)
        if built.exists():  # another process built it while this one waited
            torch.ops.load_library(str(library))
            return
        if failed.exists() and failed.stat().st_mtime >= waiting_since:
            raise RuntimeError(failed.read_text())
        (build / "lock").unlink(missing_ok=True)
        print(f"mohge: building the C++ CPU expert kernels ({SOURCE.name}) into {build} "
              "(once; 20-45 s)", file=sys.stderr, flush=True)
        try:
            load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, build_directory=str(build),
                 is_python_module=False)
        except Exception as err:
            with contextlib.suppress(OSError):  # the warning names the build's reason, not this one's
                failed.write_text(_reason(err))
            raise
        built.touch()
