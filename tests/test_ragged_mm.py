"""mohge::ragged_mm / ragged_mm_wgrad / ragged_swiglu (model/moe/ragged_mm.py) against a per-expert
reference written here, and torch.library.opcheck (shape functions, autograd registration, schema),
each with both CPU kernels: the C++ loop (model/moe/ragged_cpu.cpp) and the Python one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mohge.model.moe import cpu_kernels
from mohge.model.moe.ragged_mm import ragged_mm, ragged_swiglu

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


