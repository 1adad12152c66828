"""The MoHGE layer: routing properties, auxiliary losses, gradients and reference equivalences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import init_module, make_moe

from mohge.model.config import ExpertGroupConfig
from mohge.model.layers import FeedForward
from mohge.model.moe.layer import MoHGELayer, recording_suspended
from mohge.model.moe.losses import group_aux_loss, intra_group_aux_loss, router_z_loss
from mohge.model.moe.router import GroupRouter

D = 16


def _router(**overrides):
    moe = make_moe(**overrides)
    return moe, init_module(GroupRouter(D, moe), seed=1, std=0.5)


@pytest.mark.parametrize("mode", ["global", "per_group"])
@pytest.mark.parametrize("combine", ["renormalize", "authors"])
def test_routing_properties(mode, combine):
    top_k = 4 if mode == "per_group" else 3
    moe, router = _router(topk_mode=mode, top_k=top_k, combine=combine)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(2))
    r = router(x)
    group_of = torch.tensor(moe.expert_group_ids())

    assert (r.group_mask_TG.sum(-1) == moe.k_group).all()  # exactly k_group groups kept
    assert r.expert_idx_TK.shape == (64, top_k)
    assert all(len(set(row.tolist())) == top_k for row in r.expert_idx_TK)  # k distinct experts
    chosen_groups = group_of[r.expert_idx_TK]
    assert r.group_mask_TG.gather(-1, chosen_groups).all()  # all inside kept groups
    if mode == "per_group":
        for t in range(64):
            kept = r.group_mask_TG[t].nonzero().flatten().tolist()
            counts = torch.bincount(chosen_groups[t], minlength=moe.num_groups)
            assert all(counts[g] == top_k // moe.k_group for g in kept)

    # Recompute s by hand and check selection and weights.
    p = torch.sigmoid(x @ router.group_gate.weight.t())
    p_kept = p * r.group_mask_TG
    p_kept = p_kept / p_kept.sum(-1, keepdim=True)
    logits = x @ router.expert_gate.weight.t()
    off = moe.group_offsets()
    q = torch.cat([logits[:, off[g] : off[g + 1]].softmax(-1) for g in range(moe.num_groups)], -1)
    s = q * p_kept[:, group_of]
    assert torch.allclose(s.sum(-1), torch.ones(64))
    chosen = s.gather(-1, r.expert_idx_TK)
    if mode == "global":
        kth = chosen.min(-1).values
        others = s.masked_fill(torch.zeros_like(s, dtype=torch.bool).scatter(-1, r.expert_idx_TK, True), -1)
        assert (others.max(-1).values <= kth + 1e-7).all()  # the k largest of s
    expected = chosen.softmax(-1) if combine == "authors" else chosen / chosen.sum(-1, keepdim=True)
    assert torch.allclose(r.weights_TK, expected, atol=1e-6)
    assert torch.allclose(r.weights_TK.sum(-1), torch.ones(64))


def test_group_aux_loss_hand_computed():
    # T=2 tokens, G=2 groups, k_group=1. Token 0 keeps group 0, token 1 keeps group 1.
    logits = torch.tensor([[0.0, 0.0], [0.0, torch.log(torch.tensor(3.0))]])
    mask = torch.tensor([[True, False], [False, True]])
    w = torch.tensor([1.0, 1.5])
    # P = [[.5,.5],[.25,.75]] -> sum_t P = [.75, 1.25]; c = [1, 1]
    expected = 2 / (4 * 1) * (1.0 * 0.75 * 1 + 1.5 * 1.25 * 1)
    assert group_aux_loss(logits, mask, w, 1).item() == pytest.approx(expected)


def test_intra_group_aux_loss_hand_computed():
    # T=2, E=4 (G=2 groups of 2), k_group=1, K=1.
    scores = torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.0, 0.0, 0.3, 0.7]])
    idx = torch.tensor([[0], [3]])
    # sum_t s = [.6,.4,.3,.7]; c = [1,0,0,1]; candidates = 4*1/2 = 2
    expected = 2 / (4 * 1) * (0.6 * 1 + 0.7 * 1)
    assert intra_group_aux_loss(scores, idx, num_groups=2, k_group=1).item() == pytest.approx(expected)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0, 1.0]])
    offsets = [0, 2, 3]
    lse0 = torch.log(torch.tensor(2.0))
    expected = (lse0**2 + 1.0**2) / 2
    assert router_z_loss(logits, offsets).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("offsets", [[0, 4, 8, 12], [0, 2, 7, 12]], ids=["equal_groups", "unequal_groups"])
def test_z_loss_matches_a_loop_over_groups_with_grads(offsets):
    """The loop-free z-loss (a view, or -inf padding) against the per-group loop it replaces."""
    logits = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    expected = torch.stack([torch.logsumexp(logits[:, a:b], dim=-1).square()
                            for a, b in zip(offsets[:-1], offsets[1:])], dim=-1).mean()
    got = router_z_loss(logits, offsets)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, logits)[0], torch.autograd.grad(expected, logits)[0])


def test_z_loss_makes_no_tensor_from_host_data():
    """An index tensor built from Python lists is copied to the device on every call: on CUDA a
    copy that waits for the device, in every MoE layer's forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    logits = torch.randn(5, 12, requires_grad=True)
    with Record() as record:
        router_z_loss(logits, [0, 2, 7, 12]).backward()
    assert torch.ops.aten.lift_fresh.default not in record.ops


def test_group_width_weights():
    moe = make_moe(group_aux_width_interval=16)
    assert moe.width_weights() == [1.0, 1.5, 2.0]


def _layer(compute="loop", seed=0, dtype=torch.float32, **overrides):
    moe = make_moe(**overrides)
    layer = init_module(MoHGELayer(D, moe, compute), seed=seed).to(dtype)
    return moe, layer


def test_layer_gradcheck_float64():
    """Output and aux loss of the layer are differentiable, checked numerically in float64."""
    moe, layer = _layer(dtype=torch.float64, num_shared_experts=1, shared_ffn_hidden_size=4)
    layer.eval()  # aux returned explicitly below rather than attached
    x = torch.randn(1, 6, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)

    def fn(x, *params):
        out = layer(x)
        routing = layer.router(x.reshape(-1, D))
        return out, layer.weighted_aux_loss(layer.aux_losses(routing))

    with recording_suspended(layer):
        assert torch.autograd.gradcheck(fn, (x, *layer.parameters()), eps=1e-6, atol=1e-5, fast_mode=True)


def test_attached_aux_loss_reaches_gradients_once():
    """Backward through the attached output == backward of output plus explicit aux loss."""
    moe, layer = _layer(dtype=torch.float64)
    x = torch.randn(2, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    g = torch.randn(2, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    layer.train()
    (layer(x) * g).sum().backward()
    attached = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()

    layer.eval()
    out = layer(x)
    aux = layer.weighted_aux_loss(layer.aux_losses(layer.router(x.reshape(-1, D))))
    ((out * g).sum() + aux).backward()
    for a, b in zip(attached, [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b)
    assert layer.router.group_gate.weight.grad.abs().sum() > 0


def _reference_topk_moe(x_TD, gate_w, w1, w3, w2, k):
    """A straightforward homogeneous top-k MoE: softmax router, top-k, renormalised weights."""
    probs = (x_TD @ gate_w.t()).softmax(-1)
    top, idx = probs.topk(k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for j in range(k):
            e = idx[t, j]
            h = F.silu(x_TD[t] @ w1[e].t()) * (x_TD[t] @ w3[e].t())
            out[t] += top[t, j] * (h @ w2[e].t())
    return out


@pytest.mark.parametrize("compute", ["loop", "grouped", "ragged"])
def test_one_group_equals_homogeneous_topk_moe(compute):
    moe, layer = _layer(compute, groups=[ExpertGroupConfig(6, 8)], k_group=1, top_k=2)
    layer.eval()
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(6))
    grp = layer.experts.groups[0]
    expected = _reference_topk_moe(x.reshape(-1, D), layer.router.expert_gate.weight, grp.w1, grp.w3, grp.w2, 2)
    torch.testing.assert_close(layer(x).reshape(-1, D), expected, rtol=1e-5, atol=1e-5)


def test_one_expert_equals_dense_swiglu():
    moe, layer = _layer(groups=[ExpertGroupConfig(1, 10)], k_group=1, top_k=1)
    dense = FeedForward(D, 10)
    w1, w3, w2 = layer.experts.expert_weights(0)
    with torch.no_grad():
        dense.w1.weight.copy_(w1)
        dense.w3.weight.copy_(w3)
        dense.w2.weight.copy_(w2)
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(layer(x), dense(x))


def test_loop_and_grouped_paths_agree_with_zero_token_experts():
    torch.manual_seed(0)
    _, loop = _layer("loop", seed=7)
    _, grouped = _layer("grouped", seed=7)
    x = torch.randn(1, 3, D)  # 3 tokens x 3 slots over 12 experts: most experts get no tokens
    outs, grads = [], []
    for layer in (loop, grouped):
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    tokens_per_expert = torch.bincount(loop.router(x.reshape(-1, D)).expert_idx_TK.flatten(), minlength=12)
    assert (tokens_per_expert == 0).any()
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_grouped_path_with_aligned_segments_agrees_with_loop():
    """FP8 grouped kernels need every expert's token count to be a multiple of 16: the grouped
    path pads each segment with zero rows and drops them after, outputs and gradients unchanged."""
    from mohge.model.moe.experts import GroupedExperts, LoopExperts, grouped_mm

    seen = []

    def aligned_only(x, w_t, offs):
        sizes = torch.diff(offs, prepend=offs.new_zeros(1))
        assert (sizes % 16 == 0).all() and offs[-1] == x.shape[0]
        seen.append(sizes.tolist())
        return grouped_mm(x, w_t, offs)

    groups = [ExpertGroupConfig(2, 16), ExpertGroupConfig(2, 24)]
    loop, grouped = init_module(LoopExperts(D, groups)), GroupedExperts(D, groups)
    grouped.load_state_dict(loop.state_dict())
    grouped.gemm, grouped.align = aligned_only, 16
    counts = [5, 0, 17, 3]  # one expert with no tokens, one with more than one aligned block
    x = torch.randn(sum(counts), D)
    outs, grads = [], []
    for group in (loop, grouped):
        xi = x.clone().requires_grad_(True)
        out = group(xi, torch.tensor(counts))
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in group.parameters()])
    assert seen[0] == [16, 0, 32, 16]
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):  # same sums in another order: fp32 rounding only
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_routing_stats_record_and_suspend():
    moe, layer = _layer()
    x = torch.randn(2, 4, D)
    layer(x)
    with recording_suspended(layer):
        layer(x)  # a recomputed forward must not count
    stats = layer.stats.pop()
    assert stats["forwards"] == 1 and stats["tokens"] == 8
    assert stats["tokens_per_expert"].sum() == 8 * moe.top_k
    assert stats["group_tokens"].sum() == 8 * moe.k_group
    assert layer.stats.pop()["forwards"] == 0


def test_capacity_drops_the_later_tokens_of_a_full_expert():
    from mohge.model.moe.router import capacity_keep

    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])  # expert 0 is wanted 4 times
    keep = capacity_keep(idx, num_experts=4, capacity_factor=1.0)  # capacity ceil(8/4) = 2
    expected = torch.tensor([[True, True], [True, True], [False, True], [True, False]])
    assert torch.equal(keep, expected)


def test_capacity_layer_output_excludes_dropped_slots():
    moe, dropless = _layer(seed=9)
    _, capped = _layer(seed=9, capacity_factor=0.5)
    x = torch.randn(2, 8, D, generator=torch.Generator().manual_seed(10))
    routing = dropless.router(x.reshape(-1, D))
    from mohge.model.moe.router import capacity_keep

    keep = capacity_keep(routing.expert_idx_TK, moe.num_experts, 0.5)
    assert (~keep).any() and keep.any()
    # Reference: the dropless layer's per-slot outputs with the dropped slots zeroed.
    x_disp, counts, handle = dropless.dispatcher.dispatch(x.reshape(-1, D), routing.expert_idx_TK)
    y_TKD = dropless.dispatcher.combine(dropless.experts(x_disp, counts), handle)
    y_TKD = y_TKD * keep.unsqueeze(-1)
    expected = (y_TKD * routing.weights_TK.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(capped(x).reshape(-1, D), expected)
    stats = capped.stats.pop()
    assert stats["dropped_slots"] == float((~keep).sum())
    assert stats["tokens_per_expert"].sum() == float(keep.sum())


def test_backward_is_bit_reproducible_on_a_multithreaded_cpu():
    """Two identical backward passes give bit-identical gradients: the dispatch's token gather
    sums each token's K slot gradients in slot order (model/moe/dispatch.py TokenRows), where
    autograd's indexing backward added them atomically in thread order and runs drifted apart."""
    from mohge.model.moe.dispatch import LocalDispatcher

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        T, K, E, D = 2048, 4, 8, 64
        x = torch.randn(T, D, generator=gen, requires_grad=True)
        expert_idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
        grad_out = torch.randn(T, K, D, generator=gen)
        dispatcher, grads = LocalDispatcher(E), []
        for _ in range(4):
            x.grad = None
            rows, _, handle = dispatcher.dispatch(x, expert_idx)
            dispatcher.combine(rows * 1.5, handle).backward(grad_out)
            grads.append(x.grad.clone())
        reference = (grad_out * 1.5).sum(1)
        for g in grads:
            assert torch.equal(g, grads[0])
            torch.testing.assert_close(g, reference)
    finally:
        torch.set_num_threads(threads)
