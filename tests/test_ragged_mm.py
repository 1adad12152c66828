"""mohge::ragged_mm / ragged_mm_wgrad / ragged_swiglu (model/moe/ragged_mm.py) against a per-expert
reference written here, and torch.library.opcheck (shape functions, autograd registration, schema),
each with both CPU kernels: the C++ loop (model/moe/ragged_cpu.cpp) and the Python one."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mohge.model.moe import cpu_kernels
from mohge.model.moe.ragged_mm import ragged_mm, ragged_swiglu
from mohge.train.errors import error_line

GROUP_EXPERTS = [2, 0, 3]  # a group without local experts in the middle
WIDTHS = [8, 16, 24]
D = 12


@pytest.fixture(params=["cpp", "python"], autouse=True)
def kernel(request, monkeypatch):
    """Every test here runs with the C++ kernels and with the Python ones."""
    if request.param == "python":
        monkeypatch.setattr(cpu_kernels, "ops", lambda: None)
    elif cpu_kernels.ops() is None:
        pytest.skip("MOHGE_CPU_KERNELS=python: the C++ kernels are not built")
    return request.param


def _weights(dtype, transpose=False):
    """ws[g] [n_g, D, 2 * width] (or the transpose: [n_g, 2 * width, D])."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(n, 2 * f, D) if transpose else (n, D, 2 * f) for n, f in zip(GROUP_EXPERTS, WIDTHS)]
    return [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(True) for shape in shapes]


def _reference(x, ws, counts, out_cols):
    """Row by row, expert by expert: x[r, :K] @ w into out[r, :N], zero after (every input in the graph)."""
    out = x.new_zeros(x.shape[0], out_cols) + 0.0 * (x.sum() + sum(w.sum() for w in ws))
    rows, e = 0, 0
    for g, n in enumerate(GROUP_EXPERTS):
        K, N = ws[g].shape[1:]
        for j in range(n):
            for r in range(rows, rows + counts[e]):
                out[r, :N] = x[r, :K] @ ws[g][j]
            rows += counts[e]
            e += 1
    return out


@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("counts", [[3, 0, 4, 1, 0], [0, 0, 5, 0, 2], [0, 0, 0, 0, 0]],
                         ids=["uneven", "first_group_empty", "no_rows"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_matches_per_expert_reference_with_grads(direction, counts, dtype):
    """up: D -> each group's 2F (zero after); down: each row's first 2F columns -> D.
    In the Python kernels float64 runs the one-mm-per-expert loop, float32 torch's grouped_mm per
    group (16-byte aligned rows)."""
    up = direction == "up"
    ws = _weights(dtype, transpose=not up)
    out_cols = 2 * max(WIDTHS) if up else D
    x = torch.randn(sum(counts), D if up else 2 * max(WIDTHS), dtype=dtype,
                    generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    got = ragged_mm(x, ws, offs, out_cols)
    expected = _reference(x, ws, counts, out_cols)
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(got)
    inputs = [x, *ws]
    for a, b in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(a, b)


def test_swiglu_at_each_groups_width_and_zero_beyond():
    counts = [3, 0, 4, 1, 2]
    fm = max(WIDTHS)
    h = torch.randn(sum(counts), 2 * fm, dtype=torch.float64, requires_grad=True)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    got = ragged_swiglu(h, offs, WIDTHS, GROUP_EXPERTS)
    row_width = [WIDTHS[0]] * 3 + [WIDTHS[2]] * 7  # group 0: rows 0-2; group 2: rows 3-9
    expected = torch.stack([F.pad(F.silu(r[:f]) * r[f : 2 * f], (0, fm - f)) for r, f in zip(h, row_width)])
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, h, grad)[0], torch.autograd.grad(expected, h, grad)[0])


def test_unaligned_widths_match_the_loop_experts():
    """Widths whose rows are not 16-byte aligned (grouped_mm refuses them) take the per-expert mm."""
    from conftest import init_module

    from mohge.model.config import ExpertGroupConfig
    from mohge.model.moe.experts import LoopExperts, RaggedExperts

    groups = [ExpertGroupConfig(2, 5), ExpertGroupConfig(3, 7)]
    loop, ragged = init_module(LoopExperts(6, groups), seed=1), RaggedExperts(6, groups)
    ragged.load_state_dict(loop.state_dict())
    counts = torch.tensor([2, 0, 3, 1, 4])
    x = torch.randn(10, 6)
    outs = []
    for experts in (loop, ragged):
        xi = x.clone().requires_grad_(True)
        out = experts(xi, counts)
        out.square().sum().backward()
        outs.append([out, xi.grad, *(p.grad for p in experts.parameters())])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def test_opcheck():
    """Schema, fake (meta) shapes, autograd registration: what torch.compile relies on."""
    counts = [3, 0, 4, 1, 2]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    ws = _weights(torch.float32)
    x = torch.randn(sum(counts), D, requires_grad=True)
    torch.library.opcheck(ragged_mm, (x, ws, offs, 2 * max(WIDTHS)))
    h = torch.randn(sum(counts), 2 * max(WIDTHS), requires_grad=True)
    torch.library.opcheck(ragged_swiglu, (h, offs, WIDTHS, GROUP_EXPERTS))


def test_offsets_that_do_not_cover_x_are_refused():
    ws = _weights(torch.float32)
    with pytest.raises(ValueError, match="offsets end at 4, x has 5 rows"):
        ragged_mm(torch.randn(5, D), ws, torch.tensor([1, 1, 3, 4, 4]), 2 * max(WIDTHS))
    with pytest.raises(ValueError, match="4 offsets for 5 experts"):
        ragged_mm(torch.randn(4, D), ws, torch.tensor([1, 1, 3, 4]), 2 * max(WIDTHS))


def test_cpp_kernels_are_built_unless_python_is_chosen(kernel):
    """A machine with a compiler (CI's) runs the C++ kernels: a failed build would otherwise only
    warn and run the slower Python loop unnoticed."""
    if kernel == "python":
        pytest.skip("one check is enough")
    assert cpu_kernels.ops() is torch.ops.mohge_cpu
    assert hasattr(torch.ops.mohge_cpu, "ragged_swiglu_backward")


def test_kernel_choice_and_failed_build_fall_back_with_one_warning(kernel, monkeypatch):
    if kernel == "python":
        pytest.skip("one check is enough")
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


def test_a_build_killed_before_neither_hangs_nor_blocks_the_next(kernel, tmp_path):
    """A build killed by SIGKILL (OOM killer, scheduler) leaves torch's lock file, on which every
    later build would wait forever (SIGTERM deferred by the trainer): the next process takes over."""
    if kernel == "python":
        pytest.skip("one check is enough")
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
def test_a_failed_build_warns_with_the_compilers_reason_not_its_command(kernel, monkeypatch, log, cause):
    """torch's error for a failed build starts with the compile command: the warning names the cause."""
    if kernel == "python":
        pytest.skip("one check is enough")

    def failed_build():
        raise RuntimeError(f"Error building extension 'mohge_ragged_cpu_x': {log}")

    monkeypatch.delenv("MOHGE_CPU_KERNELS", raising=False)
    monkeypatch.setattr(cpu_kernels, "_load", failed_build)
    with pytest.warns(RuntimeWarning) as caught:
        assert cpu_kernels.ops.__wrapped__() is None
    message = str(caught[0].message)
    assert cause in message and "-MMD" not in message, message


@pytest.mark.parametrize("widths,experts", [([8, 16, 24, 24], [2, 0, 3]), ([], [])], ids=["one_width_too_many", "none"])
def test_swiglu_widths_that_do_not_match_the_groups_are_refused(widths, experts):
    """The C++ loop indexes the groups' rows by width: one width too many read past them."""
    offs = torch.tensor([1, 1, 3, 4, 4])
    h = torch.randn(4, 48)
    with pytest.raises(ValueError, match=f"ragged_swiglu: {len(widths)} widths for {len(experts)} groups"):
        torch.ops.mohge.ragged_swiglu(h, offs, widths, experts)
    with pytest.raises(ValueError, match=f"ragged_swiglu: {len(widths)} widths for {len(experts)} groups"):
        torch.ops.mohge.ragged_swiglu_backward(torch.randn(4, 24), h, offs, widths, experts)


def test_float_offsets_are_refused():
    """The C++ kernels used to truncate float offsets to ints and run."""
    with pytest.raises((ValueError, TypeError)):
        ragged_mm(torch.randn(4, D), _weights(torch.float32), torch.tensor([1.0, 1.0, 3.0, 4.0, 4.0]), 2 * max(WIDTHS))


def test_each_architecture_builds_its_own_library(monkeypatch):
    """A home directory shared by x86 and aarch64 nodes: one would load the other's library, fail,
    and fall back to the Python loop for good."""
    here = cpu_kernels.build_dir()
    other = "not-" + platform.machine()
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: other)
    assert cpu_kernels.build_dir() != here


def test_a_build_that_failed_while_others_waited_is_not_retried_by_them(kernel, tmp_path, monkeypatch):
    """The ranks of a run wait for one builder: when its build fails, they take its reason instead
    of each failing again in turn (8 ranks: 8 serial builds)."""
    if kernel == "python":
        pytest.skip("one check is enough")
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
def test_cpp_and_python_kernels_agree_bit_for_bit(kernel, monkeypatch, case):
    """Both run the same ATen mm per expert and the same SiLU kernels: training with either gives
    the same losses. Inputs the other tests do not cover."""
    if kernel == "python":
        pytest.skip("one check is enough")
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


def test_mohge_train_refuses_an_invalid_kernel_choice_before_training(kernel, monkeypatch, tmp_path, capsys):
    """Not only when the first CPU expert op runs (never, on a GPU run)."""
    if kernel == "python":
        pytest.skip("one check is enough")
    import mohge.train.trainer
    from mohge.train import cli

    def train(cfg):
        raise AssertionError("training started")

    monkeypatch.setattr(mohge.train.trainer, "train", train)
    monkeypatch.setenv("MOHGE_CPU_KERNELS", "fast")
    assert cli.main(["--config-name", "tiny_mohge", f"out_dir={tmp_path}"]) == 2
    assert "mohge-train: usage error: MOHGE_CPU_KERNELS='fast'" in capsys.readouterr().err
