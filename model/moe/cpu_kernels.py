"""The ragged expert ops' CPU kernels in C++ (model/moe/ragged_cpu.cpp), built on first use.

The Python kernels of model/moe/ragged_mm.py issue one mm per expert from Python; the C++ ones run
the same loop without the interpreter in between (the difference is measured in bench/bench_moe.py,
docs/performance.md). torch's extension builder compiles the file once per machine (about 20 s
on 2 cores; needs a C++ compiler, as torch.compile's CPU backend does, and ninja, which the
`ninja` wheel among the dependencies brings), into
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) under a name that hashes the source,
torch's version and the flags, so an edited file or another torch builds anew and every later
process only loads the library.

MOHGE_CPU_KERNELS=python keeps the Python kernels (same results); where the build fails, they
run after one warning that names the reason.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("ragged_cpu.cpp")
FLAGS = ["-O3"]
CHOICES = ("cpp", "python")


def choice() -> str:
    value = os.environ.get("MOHGE_CPU_KERNELS", "cpp")
    if value not in CHOICES:
        raise ValueError(f"MOHGE_CPU_KERNELS={value!r}: use one of {', '.join(CHOICES)}")
    return value


@functools.cache
def ops():
    """torch.ops.mohge_cpu (ragged_mm, ragged_mm_wgrad, ragged_swiglu, ragged_swiglu_backward), or
    None: the Python kernels run (MOHGE_CPU_KERNELS=python, or the build failed)."""
    if choice() == "python":
        return None
    try:
        _load()
    except Exception as err:  # no compiler, no ninja, a read-only cache...: the Python loop still works
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"mohge: the C++ CPU expert kernels ({SOURCE.name}) could not be built ({reason}); "
                      "the Python kernels run instead (same results, slower). MOHGE_CPU_KERNELS=python "
                      "selects them without trying.", RuntimeWarning, stacklevel=2)
        return None
    return torch.ops.mohge_cpu


def _load() -> None:
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(FLAGS).encode())
    name = f"mohge_ragged_cpu_{digest.hexdigest()[:12]}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    build = root / name
    library = build / f"{name}.so"
    # Built before (and not being built now: torch's builder holds `lock` while it runs): load it.
    if library.exists() and not (build / "lock").exists():
        torch.ops.load_library(str(library))
        return
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # the ninja wheel's binary sits beside the interpreter's scripts
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    build.mkdir(parents=True, exist_ok=True)
    load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, build_directory=str(build),
         is_python_module=False)
