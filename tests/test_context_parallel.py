"""Context parallel (parallel/context_parallel.py): load-balanced sharding, the sequence all-gather
op, and model loss/gradients under cp=2 against the single process (gloo)."""

from __future__ import annotations

import pytest
import torch
from distributed import run_ranks

from mohge.parallel.context_parallel import load_balanced_positions, shard_sequence


def test_load_balanced_positions_cover_the_sequence_and_balance_causal_work():
    S, cp = 16, 4
    parts = [load_balanced_positions(S, cp, r) for r in range(cp)]
    assert torch.cat(parts).sort().values.tolist() == list(range(S))
    assert parts[0].tolist() == [0, 1, 14, 15] and parts[3].tolist() == [6, 7, 8, 9]
    # causal work of a query at position p is p + 1 keys: equal on every rank
    assert len({int((p + 1).sum()) for p in parts}) == 1
    x = torch.arange(2 * S).view(2, S)
    assert shard_sequence(x, cp, 1).tolist() == [[2, 3, 12, 13], [18, 19, 28, 29]]
    with pytest.raises(ValueError, match="train.seq_len"):
        load_balanced_positions(12, 4, 0)


def _all_gather_rank(rank, world):
    import torch.distributed as dist

    from mohge.parallel.context_parallel import AllGatherSequence

    x = torch.full((1, 2, 3, 2), float(rank), requires_grad=True)
    y = AllGatherSequence.apply(x, dist.group.WORLD, 2)
    weight = torch.arange(y.numel(), dtype=torch.float32).view_as(y)
    (y * weight).sum().backward()
    return y.detach(), x.grad, weight


@pytest.mark.multirank
def test_all_gather_sequence_forward_and_backward():
    world = 2
    for rank, (y, grad, weight) in enumerate(run_ranks(world, _all_gather_rank)):
        assert y[0, 0, :, 0].tolist() == [0, 0, 0, 1, 1, 1]
        # every rank used the same weight, so the summed gradient of its slice is world * weight
        torch.testing.assert_close(grad, world * weight[:, :, rank * 3:(rank + 1) * 3])


def _cfg(attention: str, ffn_type: str, aux: bool = False):
    from mohge.model.config import ExpertGroupConfig, MLAConfig, ModelConfig, MoEConfig, RopeScalingConfig

    kw = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=48, max_seq_len=32,
              ffn_type=ffn_type, moe=MoEConfig(intra_aux_coeff=0.0, group_aux_coeff=0.0))
    if aux:  # large coefficients so that a per-rank (wrong) aux loss shows in the gradients
        groups = [ExpertGroupConfig(4, 16), ExpertGroupConfig(4, 32)]
        kw["moe"] = MoEConfig(groups=groups, k_group=1, top_k=2, group_aux_coeff=0.5, group_aux_start_fraction=0.0,
                              intra_aux_coeff=0.5, z_loss_coeff=0.1)
    if attention == "mla":
        kw.update(n_kv_heads=4, attention="mla",
                  mla=MLAConfig(q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
                  rope_scaling=RopeScalingConfig(type="yarn", factor=4.0, original_max_seq_len=8, mscale=1.0,
                                                 mscale_all_dim=1.0))
    return ModelConfig(**kw)


def _loss_and_grads(attention, ffn_type, group=None, aux=False, comm="ring"):
    import torch.distributed as dist
    import torch.nn.functional as F

    from mohge.model.transformer import build_model
    from mohge.parallel.context_parallel import apply_context_parallel

    model = build_model(_cfg(attention, ffn_type, aux), "meta")
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(5))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if group is not None:
        positions = apply_context_parallel(model, group, inputs.shape[1], comm)
        inputs, labels = inputs[:, positions], labels[:, positions]
    model.to_empty(device="cpu")
    model.init_weights(11)
    loss = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss = loss.detach()
    if group is not None:  # mean over the cp group's tokens (equal shares), gradients averaged
        cp = dist.get_world_size(group)
        dist.all_reduce(loss, group=group)
        for g in grads.values():
            dist.all_reduce(g, group=group)
            g /= cp
        loss /= cp
    return float(loss), grads


def _cp_rank(rank, world, attention, ffn_type, aux=False, comm="ring"):
    import torch.distributed as dist

    return _loss_and_grads(attention, ffn_type, dist.group.WORLD, aux, comm)


def _ring_rank(rank, world, H, Hkv, K, V, scale):
    import torch.distributed as dist

    from mohge.parallel.ring_attention import ring_attention

    q, k, v, w = _ring_inputs(world * 4, H, Hkv, K, V)
    positions = load_balanced_positions(q.shape[2], world, rank)
    parts = [x[:, :, positions].detach().requires_grad_() for x in (q, k, v)]
    out = ring_attention(*parts, scale, dist.group.WORLD)
    (out * w[:, :, positions]).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the block math stays float32 under autocast
        assert torch.equal(ring_attention(*parts, scale, dist.group.WORLD), out)
    return positions, out.detach(), [x.grad for x in parts]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("H,Hkv,K,V", [(4, 2, 12, 8), (2, 2, 6, 10)])
def test_block_attention_kernel_and_math_paths_agree(H, Hkv, K, V, causal):
    """The ring's per-block forward (output, log-sum-exp) and backward (given the global output and
    log-sum-exp of a merge with a second block) agree between the CPU flash kernel and plain math,
    and with autograd through SDPA over both blocks (GQA, qk dim != v dim both ways)."""
    import torch.nn.functional as F

    from mohge.parallel import ring_attention as ra

    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, H, 6, K, generator=g), torch.randn(2, Hkv, 6, K, generator=g), torch.randn(2, Hkv, 6, V,
                                                                                                        generator=g)
    k0, v0 = torch.randn(2, Hkv, 5, K, generator=g), torch.randn(2, Hkv, 5, V, generator=g)  # an earlier block
    dout = torch.randn(2, H, 6, V, generator=g)
    results = []
    for fused in (True, False):
        ra.FUSED_CPU = fused
        try:
            o1, l1 = ra.block_attention(q, k, v, 0.4, causal)
            o0, l0 = ra.block_attention(q, k0, v0, 0.4, False)
            out, lse = ra.merge(o1, l1, o0, l0)
            grads = ra.block_attention_backward(q, k, v, dout, out, lse, 0.4, causal)
            grads0 = ra.block_attention_backward(q, k0, v0, dout, out, lse, 0.4, False)
        finally:
            ra.FUSED_CPU = True
        results.append((out, grads[0] + grads0[0], grads[1], grads[2], grads0[1], grads0[2]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # reference: SDPA over [earlier block | this block], the earlier block fully visible
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, torch.cat([k0, k], 2), torch.cat([v0, v], 2)))
    mask = torch.ones(6, 11, dtype=torch.bool)
    if causal:
        mask[:, 5:] = torch.ones(6, 6, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, scale=0.4, enable_gqa=H != Hkv)
    (ref * dout).sum().backward()
    out, dq, dk, dv, dk0, dv0 = results[0]
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq, qr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([dk0, dk], 2), kr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([dv0, dv], 2), vr.grad, rtol=1e-5, atol=1e-5)


def _ring_inputs(S, H, Hkv, K, V):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, H, S, K, generator=g), torch.randn(2, Hkv, S, K, generator=g),
            torch.randn(2, Hkv, S, V, generator=g), torch.randn(2, H, S, V, generator=g))


@pytest.mark.multirank
@pytest.mark.parametrize("world,H,Hkv,K,V", [
    pytest.param(2, 4, 4, 8, 8, marks=pytest.mark.slow), (4, 4, 2, 12, 8),
], ids=["cp2-mha", "cp4-gqa-mla-dims"])
def test_ring_attention_matches_causal_sdpa(world, H, Hkv, K, V):
    """Each rank's ring output and its q/k/v gradients equal causal SDPA over the whole sequence
    (grouped-query heads; qk head dim != v head dim as in MLA; a non-default scale as YaRN's)."""
    import torch.nn.functional as F

    scale = 0.3
    q, k, v, w = (x.requires_grad_() for x in _ring_inputs(world * 4, H, Hkv, K, V))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=H != Hkv)
    (want * w).sum().backward()
    for positions, out, grads in run_ranks(world, _ring_rank, H, Hkv, K, V, scale):
        torch.testing.assert_close(out, want.detach()[:, :, positions], rtol=1e-5, atol=1e-6)
        for got, ref in zip(grads, (q.grad, k.grad, v.grad)):
            torch.testing.assert_close(got, ref[:, :, positions], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("attention,ffn_type,comm", [
    ("gqa", "dense", "ring"), ("mla", "mohge", "ring"), ("gqa", "dense", "all_gather"), ("mla", "mohge", "all_gather"),
])
def test_context_parallel_matches_single_process(attention, ffn_type, comm):
    """cp=2 with load-balanced causal sharding, ring and all-gather attention: same loss and
    gradients as one process (GQA with 2 kv heads; MLA + YaRN with MoHGE FFNs, aux losses off: see
    the MoE aux test)."""
    want_loss, want = _loss_and_grads(attention, ffn_type)
    for got_loss, got in run_ranks(2, _cp_rank, attention, ffn_type, False, comm):
        assert got_loss == pytest.approx(want_loss, rel=1e-6)
        for name, g in want.items():
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.multirank
def test_context_parallel_moe_aux_losses_span_the_whole_sequence():
    """Group-wise, intra-group and z losses (large coefficients, two size groups) under cp=2: the
    gradients equal the single process, whose losses see every token of the micro-batch."""
    want_loss, want = _loss_and_grads("gqa", "mohge", aux=True)
    for got_loss, got in run_ranks(2, _cp_rank, "gqa", "mohge", True):
        assert got_loss == pytest.approx(want_loss, rel=1e-6)
        for name, g in want.items():
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("overrides,needle", [
    (["parallel.dp_replicate=2", "parallel.cp=4"], "parallel.cp: 4 must divide"),
    (["parallel.dp_replicate=2", "parallel.cp=2", "train.seq_len=30"], "train.seq_len: 30"),
    (["parallel.dp_replicate=2", "parallel.cp=2", "parallel.tp=4", "model.n_kv_heads=4", "train.seq_len=12"],
     "sequence parallel"),
    (["parallel.cp=0"], "parallel.cp: must be >= 1"),
    (["parallel.cp_comm=ulysses"], "parallel.cp_comm: must be one of"),
    (["parallel.cp_comm=all_gather"], "parallel.cp_comm=all_gather: only applies with parallel.cp > 1"),
])
def test_bad_context_parallel_config_names_the_field(overrides, needle):
    from mohge.model.config import ConfigError
    from mohge.train.hydra_config import compose_config

    with pytest.raises(ConfigError, match=needle):
        compose_config("tiny_mohge", ["parallel.dp_shard=1", *overrides])  # a fixed layout, not inferred


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("layout,attention", [
    (["parallel.dp_replicate=2", "parallel.cp=2", "parallel.activation_checkpoint=full"], "gqa"),
    (["parallel.dp_shard=4", "parallel.cp=2", "parallel.ep=2"], "mla"),
], ids=["dp2-cp2-gqa-ac", "fsdp4-cp2-ep2-mla"])
def test_training_with_context_parallel_matches_single_process(tmp_path, layout, attention):
    """mohge-train (tiny_mohge, aux losses on): losses, grad norms, validation losses, final weights
    and expert loads under cp=2 equal the single process reading the same global batches."""
    from test_mla_parallel import MLA
    from test_train_parallel import _assert_same_weights, _nproc, _run, _val_losses

    extra = MLA if attention == "mla" else []
    ref = _run(tmp_path / "ref", 1, *extra)
    lines = _run(tmp_path / "cp", _nproc(layout), *extra, *layout)
    assert [l["lm_loss"] for l in lines] == pytest.approx([l["lm_loss"] for l in ref], rel=1e-5)
    assert [l["grad_norm"] for l in lines] == pytest.approx([l["grad_norm"] for l in ref], rel=1e-5)
    assert [l["intra_group_aux_loss"] for l in lines] == pytest.approx([l["intra_group_aux_loss"] for l in ref],
                                                                       rel=1e-5)
    assert _val_losses(lines) == pytest.approx(_val_losses(ref), rel=1e-5)
    assert lines[0]["moe"]["layers.0.ffn"]["expert_load"] == pytest.approx(ref[0]["moe"]["layers.0.ffn"]["expert_load"])
    _assert_same_weights(tmp_path / "cp", tmp_path / "ref")


@pytest.fixture(scope="module")
def pp_ref(tmp_path_factory):
    from test_train_parallel import PP, _run

    out = tmp_path_factory.mktemp("cp_ppref")
    return out, _run(out, 1, *PP)


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("layout", [
    ["parallel.dp_replicate=2", "parallel.cp=2", "parallel.tp=2"],
    ["parallel.dp_replicate=2", "parallel.cp=2", "parallel.pp=2"],
], ids=["dp2-cp2-tp2", "dp2-cp2-pp2"])
def test_context_parallel_composes_with_tp_and_pp(tmp_path, pp_ref, layout):
    """cp=2 with tensor (sequence) parallel or a pipeline: single-process losses, grad norms,
    validation losses and final weights (one sequence per micro-batch, 4 layers)."""
    from test_train_parallel import PP, _assert_same_weights, _nproc, _run, _val_losses

    ref_dir, ref = pp_ref
    lines = _run(tmp_path, _nproc(layout), *PP, *layout)
    assert [l["lm_loss"] for l in lines] == pytest.approx([l["lm_loss"] for l in ref], rel=1e-5)
    assert [l["grad_norm"] for l in lines] == pytest.approx([l["grad_norm"] for l in ref], rel=1e-5)
    assert _val_losses(lines) == pytest.approx(_val_losses(ref), rel=1e-5)
    _assert_same_weights(tmp_path, ref_dir)
