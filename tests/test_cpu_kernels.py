"""The C++ CPU kernels of the ragged ops (model/moe/ragged_cpu.cpp) and their loader
(model/moe/cpu_kernels.py): built where a compiler is, the same results as the Python kernels bit
for bit, one clear line or warning for every way a build can fail, and builds that neither hang
nor repeat. The ops' semantics with both kernels: tests/test_ragged_mm.py."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from mohge.model.moe import cpu_kernels
from mohge.model.moe.ragged_mm import ragged_mm, ragged_swiglu
from mohge.train.errors import error_line

GROUP_EXPERTS = [2, 0, 3]
WIDTHS = [8, 16, 24]
D = 12


@pytest.fixture
def built():
    """The C++ kernels, built (skipped where MOHGE_CPU_KERNELS=python keeps them off)."""
    if os.environ.get("MOHGE_CPU_KERNELS") == "python":
        pytest.skip("MOHGE_CPU_KERNELS=python: the C++ kernels are not built")
    return cpu_kernels.ops()


def test_cpp_kernels_are_built_unless_python_is_chosen(built):
    """A machine with a compiler (CI's) runs the C++ kernels: a failed build would otherwise only
    warn and run the slower Python loop unnoticed."""
    assert cpu_kernels.ops() is torch.ops.mohge_cpu
    assert hasattr(torch.ops.mohge_cpu, "ragged_swiglu_backward")


def test_kernel_choice_and_failed_build_fall_back_with_one_warning(monkeypatch):
    ops = cpu_kernels.ops.__wrapped__  # uncached
    monkeypatch.setenv("MOHGE_CPU_KERNELS", "fast")
    with pytest.raises(ValueError, match="MOHGE_CPU_KERNELS='fast': use one of cpp, python") as err:
        ops()
    assert error_line("train", err.value).startswith("mohge-train: usage error: MOHGE_CPU_KERNELS='fast'")
    monkeypatch.setenv("MOHGE_CPU_KERNELS", "python")
    assert ops() is None

    def no_compiler():
        raise RuntimeError("Error building extension 'mohge_ragged_cpu_x'\nc++: not found")

    monkeypatch.delenv("MOHGE_CPU_KERNELS")  # the default: fall back after one warning
    monkeypatch.setattr(cpu_kernels, "_load", no_compiler)
    with pytest.warns(RuntimeWarning, match=r"could not be built \(the build failed: c\+\+: not found\); the Python kernels run"):
        assert ops() is None
    monkeypatch.setenv("MOHGE_CPU_KERNELS", "cpp")  # asked for by name: an error, not something else
    with pytest.raises(ValueError, match=r"MOHGE_CPU_KERNELS=cpp: the C\+\+ CPU expert kernels could not be built "
                                         r"\(the build failed: c\+\+: not found\); install a C\+\+ compiler"):
        ops()


def test_a_build_killed_before_neither_hangs_nor_blocks_the_next(built, tmp_path):
    """A build killed by SIGKILL (OOM killer, scheduler) leaves torch's lock file, on which every
    later build would wait forever (SIGTERM deferred by the trainer): the next process takes over."""
    cpu_kernels.ops()
    built = cpu_kernels.build_dir()
    stale = tmp_path / built.name
    shutil.copytree(built, stale, ignore=shutil.ignore_patterns("built", "build.lock", "lock"))
    (stale / "lock").touch()  # as torch's builder leaves it when killed
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "MOHGE_CPU_KERNELS": "cpp"}
    code = "from mohge.model.moe import cpu_kernels; print(cpu_kernels.ops() is not None)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True", run.stderr


@pytest.mark.parametrize("log,cause", [
    ("[1/2] /nonexistent -MMD -MF ragged_cpu.o.d -O3 -c ragged_cpu.cpp -o ragged_cpu.o\nFAILED: [code=127] ragged_cpu.o \n"
     "/nonexistent -MMD -MF ragged_cpu.o.d -O3 -c ragged_cpu.cpp -o ragged_cpu.o \n/bin/sh: 1: /nonexistent: not found\n"
     "ninja: build stopped: subcommand failed.\n", "/bin/sh: 1: /nonexistent: not found"),
    ("[1/2] c++ -MMD -MF ragged_cpu.o.d -c ragged_cpu.cpp -o ragged_cpu.o\nFAILED: ragged_cpu.o\nc++ -MMD -MF x -c y\n"
     "ragged_cpu.cpp:12:10: fatal error: ATen/ATen.h: No such file or directory\ncompilation terminated.\n"
     "ninja: build stopped: subcommand failed.", "ragged_cpu.cpp:12:10: fatal error: ATen/ATen.h: No such file"),
], ids=["no_compiler", "compile_error"])
def test_a_failed_build_warns_with_the_compilers_reason_not_its_command(monkeypatch, log, cause):
    """torch's error for a failed build starts with the compile command: the warning names the cause."""

    def failed_build():
        raise RuntimeError(f"Error building extension 'mohge_ragged_cpu_x': {log}")

    monkeypatch.delenv("MOHGE_CPU_KERNELS", raising=False)
    monkeypatch.setattr(cpu_kernels, "_load", failed_build)
    with pytest.warns(RuntimeWarning) as caught:
        assert cpu_kernels.ops.__wrapped__() is None
    message = str(caught[0].message)
    assert cause in message and "-MMD" not in message, message


def test_each_architecture_builds_its_own_library(built, monkeypatch):
    """A home directory shared by x86 and aarch64 nodes: one would load the other's library, fail,
    and fall back to the Python loop for good."""
    here = cpu_kernels.build_dir()
    other = "not-" + platform.machine()
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: other)
    assert cpu_kernels.build_dir() != here


def test_a_build_that_failed_while_others_waited_is_not_retried_by_them(tmp_path, monkeypatch):
    """The ranks of a run wait for one builder: when its build fails, they take its reason instead
    of each failing again in turn (8 ranks: 8 serial builds)."""
    import threading
    import time
    import torch.utils.cpp_extension

    builds = []

    def failing_build(**kwargs):
        builds.append(kwargs["name"])
        time.sleep(2.0)  # the other ranks are waiting by then
        raise RuntimeError(f"Error building extension '{kwargs['name']}': [1/2] c++ -MMD x\n/bin/sh: 1: c++: not found")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", failing_build)
    errors = []

    def rank():
        try:
            cpu_kernels._load()
        except RuntimeError as err:
            errors.append(cpu_kernels._reason(err))

    ranks = [threading.Thread(target=rank) for _ in range(3)]  # flock: each open() is its own lock holder
    for t in ranks:
        t.start()
    for t in ranks:
        t.join(timeout=60)
    assert len(builds) == 1
    assert errors == ["the build failed: /bin/sh: 1: c++: not found"] * 3

    # Where the failure cannot be recorded, the reason is still the build's.
    shutil.rmtree(tmp_path / cpu_kernels.build_dir().name)
    (cpu_kernels.build_dir() / "failed").mkdir(parents=True)
    errors.clear()
    rank()
    assert errors == ["the build failed: /bin/sh: 1: c++: not found"]


@pytest.mark.parametrize("case", ["bf16", "strided_x", "int64_offs", "all_rows_to_one_expert", "odd_widths"])
def test_cpp_and_python_kernels_agree_bit_for_bit(built, monkeypatch, case):
    """Both run the same ATen mm per expert and the same SiLU kernels: training with either gives
    the same losses. Inputs the other tests do not cover."""
    gen = torch.Generator().manual_seed(2)
    widths, experts, d = ([1, 7, 13], [1, 2, 2], 5) if case == "odd_widths" else (WIDTHS, GROUP_EXPERTS, D)
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    counts = [0, 0, 0, 0, 10] if case == "all_rows_to_one_expert" else [3, 0, 4, 1, 2]
    offs = torch.tensor(counts).cumsum(0).to(torch.int64 if case == "int64_offs" else torch.int32)
    ws = [torch.randn(n, d, 2 * f, generator=gen).to(dtype) for f, n in zip(widths, experts)]
    x = torch.randn(10, 2 * d if case == "strided_x" else d, generator=gen).to(dtype)
    fm = max(widths)

    def run():
        xi, wi = x.clone().requires_grad_(True), [w.clone().requires_grad_(True) for w in ws]
        x_in = xi[:, ::2] if case == "strided_x" else xi  # every other column: not contiguous
        y = ragged_swiglu(ragged_mm(x_in, wi, offs, 2 * fm), offs, widths, experts)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype))
        return [y, xi.grad, *(w.grad for w in wi)]

    cpp = run()
    monkeypatch.setattr(cpu_kernels, "ops", lambda: None)
    for a, b in zip(cpp, run()):
        assert torch.equal(a, b)


def test_mohge_train_refuses_an_invalid_kernel_choice_before_training(monkeypatch, tmp_path, capsys):
    """Not only when the first CPU expert op runs (never, on a GPU run)."""
    import mohge.train.trainer
    from mohge.train import cli

    def train(cfg):
        raise AssertionError("training started")

    monkeypatch.setattr(mohge.train.trainer, "train", train)
    monkeypatch.setenv("MOHGE_CPU_KERNELS", "fast")
    assert cli.main(["--config-name", "tiny_mohge", f"out_dir={tmp_path}"]) == 2
    assert "mohge-train: usage error: MOHGE_CPU_KERNELS='fast'" in capsys.readouterr().err
