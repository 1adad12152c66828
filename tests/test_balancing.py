"""Load balancing: the authors' intra-group loss, balance scopes, aux-loss-free bias, HMoE router.

References are written here from the papers' / authors' formulations, independently of the code.
"""

from __future__ import annotations

import pytest
import torch
from conftest import init_module, make_moe

from mohge.model.config import ConfigError, ExpertGroupConfig
from mohge.model.moe.balance import apply_global_counts, init_balance_buffers
from mohge.model.moe.layer import MoHGELayer

D = 16


def _layer(seed: int = 1, **overrides) -> MoHGELayer:
    moe = make_moe(**overrides)
    moe.validate(D)
    layer = init_module(MoHGELayer(D, moe), seed=seed, std=0.5)
    init_balance_buffers(layer)
    return layer


def _x(T: int = 48, seed: int = 2) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def authors_intra_loss(x_TD, w_group_GD, w_expert_ED, cfg) -> torch.Tensor:
    """L_I as the authors' Megatron patch computes it, token by token.

    Two-level scores s (sigmoid groups, top K_g kept and renormalised, softmax inside each group,
    product renormalised), handed to Megatron's top-k as if they were logits: the routing
    probabilities are a softmax over the k selected s, scattered at the selected experts (0
    elsewhere). Switch loss with E K_g / G candidate experts.
    """
    T = x_TD.shape[0]
    E, G, K = cfg.num_experts, cfg.num_groups, cfg.top_k
    off = cfg.group_offsets()
    rows = []
    for t in range(T):
        p = torch.sigmoid(w_group_GD @ x_TD[t])
        kept = sorted(torch.argsort(p, descending=True)[: cfg.k_group].tolist())
        norm = sum(p[g] for g in kept)
        s = [torch.zeros(()) for _ in range(E)]
        for g in kept:
            q = torch.softmax(w_expert_ED[off[g] : off[g + 1]] @ x_TD[t], dim=0)
            for i in range(off[g + 1] - off[g]):
                s[off[g] + i] = q[i] * p[g] / norm
        s = torch.stack(s)
        s = s / s.sum()
        top_vals, top_idx = torch.topk(s, K)
        probs = torch.softmax(top_vals, dim=0)
        row = torch.zeros(E).index_put((top_idx,), probs)
        rows.append(row)
    routing_probs_TE = torch.stack(rows)
    tokens_per_expert = (routing_probs_TE > 0).sum(0).float()
    candidates = E * cfg.k_group / G
    return candidates / (T * T * K) * (routing_probs_TE.sum(0) * tokens_per_expert).sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_authors_intra_group_loss_sees_sparse_routing_probabilities(seed):
    layer = _layer(seed=seed, combine="authors")
    x = _x(seed=seed + 10)
    routing = layer.router(x)
    got = layer.aux_losses(routing)["intra_group_aux_loss"]
    wg = layer.router.group_gate.weight.detach().clone().requires_grad_(True)
    we = layer.router.expert_gate.weight.detach().clone().requires_grad_(True)
    want = authors_intra_loss(x, wg, we, layer.cfg)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    got.backward()
    want.backward()
    torch.testing.assert_close(layer.router.group_gate.weight.grad, wg.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(layer.router.expert_gate.weight.grad, we.grad, rtol=1e-4, atol=1e-7)
    # Sparse: exactly the K selected experts carry probability, and it sums to 1 per token.
    assert (routing.aux_scores_TE > 0).sum(-1).eq(layer.cfg.top_k).all()
    torch.testing.assert_close(routing.aux_scores_TE.sum(-1), torch.ones(x.shape[0]))


def test_router_init_std_is_used():
    from mohge.train.hydra_config import compose_config
    from mohge.model.transformer import build_model

    cfg = compose_config("tiny_mohge", ["model.moe.router_init_std=0.5"])
    model = build_model(cfg.model, "meta")
    model.to_empty(device="cpu")
    model.init_weights(0)
    gate = model.layers["0"].ffn.router.expert_gate.weight
    assert gate.std().item() == pytest.approx(0.5, rel=0.15)  # 12 x 32 draws
    assert model.layers["0"].attention.wq.weight.std().item() == pytest.approx(cfg.model.init_std, rel=0.1)
    with pytest.raises(ConfigError, match="router_init_std"):
        make_moe(router_init_std=0.0).validate(D)


# ---- balance scopes ---------------------------------------------------------------------------
def _switch_reference(probs_TX, slots_TX, weight_X):
    """sum_x w_x * (sum_t P[t,x] / T) * (sum_t slots[t,x] / T): one Switch term, by hand."""
    T = probs_TX.shape[0]
    return sum(weight_X[x] * probs_TX[:, x].sum() / T * slots_TX[:, x].sum() / T for x in range(probs_TX.shape[1]))


def test_sequence_scope_is_the_mean_of_per_sequence_losses():
    layer = _layer(balance_scope="sequence")
    B, S = 3, 16
    x = _x(B * S)
    routing = layer.router(x)
    got = layer.aux_losses(routing, batch_size=B)
    cfg = layer.cfg
    E, G = cfg.num_experts, cfg.num_groups
    w = torch.tensor(cfg.width_weights())
    want_group, want_intra = 0.0, 0.0
    for b in range(B):
        rows = slice(b * S, (b + 1) * S)
        group_probs = routing.group_logits_TG[rows].softmax(-1)
        want_group += G / cfg.k_group * _switch_reference(group_probs, routing.group_mask_TG[rows].float(), w) / B
        slots = torch.zeros(S, E).scatter_(-1, routing.expert_idx_TK[rows], 1.0)
        want_intra += (E * cfg.k_group / G) / cfg.top_k * _switch_reference(
            routing.aux_scores_TE[rows], slots, torch.ones(E)) / B
    torch.testing.assert_close(got["group_aux_loss"], torch.as_tensor(want_group), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["intra_group_aux_loss"], torch.as_tensor(want_intra), rtol=1e-5, atol=1e-7)
    # One sequence: the sequence scope is the micro-batch loss.
    micro = _layer(balance_scope="micro_batch")
    r1 = micro.router(x[:S])
    torch.testing.assert_close(micro.aux_losses(r1, 1)["intra_group_aux_loss"],
                               layer.aux_losses(layer.router(x[:S]), 1)["intra_group_aux_loss"])


def test_global_scope_uses_the_stored_global_counts_and_their_gradient():
    layer = _layer(balance_scope="global_batch")
    cfg = layer.cfg
    E, G = cfg.num_experts, cfg.num_groups
    # Before any step: uniform slots per token.
    assert torch.allclose(layer.global_expert_slots, torch.full((E,), cfg.top_k / E))
    counts_E = torch.arange(1.0, E + 1)
    counts_E = counts_E / counts_E.sum() * 30 * cfg.top_k
    counts_G = torch.tensor([10.0, 20.0, 30.0])
    apply_global_counts(layer, torch.cat([counts_E, counts_G, torch.tensor([30.0])]).double())
    torch.testing.assert_close(layer.global_expert_slots, (counts_E / 30).float())
    x = _x()
    routing = layer.router(x)
    got = layer.aux_losses(routing)["intra_group_aux_loss"]
    want = (E * cfg.k_group / G) / cfg.top_k * (routing.aux_scores_TE.mean(0) * counts_E / 30).sum()
    torch.testing.assert_close(got, want.float())
    got_g = layer.aux_losses(routing)["group_aux_loss"]
    w = torch.tensor(cfg.width_weights())
    want_g = G / cfg.k_group * (w * routing.group_logits_TG.softmax(-1).mean(0) * counts_G / 30).sum()
    torch.testing.assert_close(got_g, want_g.float())


def test_global_scope_counts_accumulate_over_micro_batches_without_recompute():
    """The step counts sum every training forward; recomputed (suspended) and eval forwards do not count."""
    from mohge.model.moe.layer import recording_suspended

    layer = _layer(balance_scope="global_batch").train()
    x1, x2 = _x(seed=3).view(1, -1, D), _x(seed=4).view(1, -1, D)
    layer(x1)
    with recording_suspended(layer):
        layer(x1)
    layer(x2)
    layer.eval()
    layer(x1)
    counts = layer.balance.pop(torch.device("cpu"))
    E = layer.cfg.num_experts
    want = sum(torch.bincount(layer.router(x.view(-1, D)).expert_idx_TK.flatten(), minlength=E) for x in (x1, x2))
    assert counts[:E].tolist() == want.double().tolist()
    assert counts[-1].item() == 2 * x1.shape[1]


# ---- aux-loss-free bias -----------------------------------------------------------------------
def test_bias_steers_selection_only():
    layer = _layer(bias_update_rate=0.1, group_bias_update_rate=0.1)
    x = _x()
    before = layer.router(x)
    with torch.no_grad():
        layer.router.expert_bias[0:4] = 10.0  # group 0's experts win whenever group 0 is kept
        layer.router.group_bias[0] = 10.0  # group 0 always kept
    after = layer.router(x)
    assert after.group_mask_TG[:, 0].all()
    chosen = after.expert_idx_TK
    assert ((chosen < 4).sum(-1) == layer.cfg.top_k).all()
    # Weights are the unbiased s of the chosen experts, renormalised.
    s_chosen = after.aux_scores_TE.gather(-1, chosen)
    torch.testing.assert_close(after.weights_TK, s_chosen / s_chosen.sum(-1, keepdim=True))
    assert not torch.equal(before.expert_idx_TK, after.expert_idx_TK)


def test_bias_update_rule_within_groups():
    layer = _layer(bias_update_rate=0.5, group_bias_update_rate=0.25)
    E = layer.cfg.num_experts
    load_E = torch.tensor([4.0, 2, 2, 0, 1, 1, 1, 1, 9, 0, 0, 3])
    groups_G = torch.tensor([5.0, 3.0, 4.0])
    apply_global_counts(layer, torch.cat([load_E, groups_G, torch.tensor([6.0])]).double())
    # Group 0 mean 2: [4,2,2,0] -> [-,0,0,+]; group 1 all equal -> 0; group 2 mean 3: [9,0,0,3] -> [-,+,+,0]
    want = torch.tensor([-0.5, 0, 0, 0.5, 0, 0, 0, 0, -0.5, 0.5, 0.5, 0])
    torch.testing.assert_close(layer.router.expert_bias, want)
    torch.testing.assert_close(layer.router.group_bias, torch.tensor([-0.25, 0.25, 0.0]))
    assert layer.router.expert_bias.shape == (E,)


def test_bias_options_that_do_nothing_are_errors():
    with pytest.raises(ConfigError, match="group_bias_update_rate"):
        make_moe(group_bias_update_rate=0.1, k_group=3).validate(D)
    with pytest.raises(ConfigError, match="balance_scope"):
        make_moe(balance_scope="batch").validate(D)


# ---- HMoE flat router -------------------------------------------------------------------------
def _flat(**overrides) -> MoHGELayer:
    base = dict(router="flat", k_group=1, group_aux_coeff=0.0, top_k=3)
    base.update(overrides)
    return _layer(**base)


def test_flat_router_top_k_and_parameter_penalty():
    layer = _flat()
    cfg = layer.cfg
    x = _x()
    r = layer.router(x)
    probs = (x @ layer.router.gate.weight.t()).softmax(-1)
    top = probs.topk(cfg.top_k, dim=-1)
    assert torch.equal(r.expert_idx_TK, top.indices)
    torch.testing.assert_close(r.weights_TK, top.values / top.values.sum(-1, keepdim=True))
    # Parameter penalty (HMoE): N/K * sum_e (m_e / mean m) * f_e * P_e with f_e = slots per token.
    sizes = torch.tensor([float(cfg.groups[g].ffn_hidden_size) for g in cfg.expert_group_ids()])
    slots = torch.zeros_like(probs).scatter_(-1, top.indices, 1.0)
    want = cfg.num_experts / cfg.top_k * _switch_reference(probs, slots, sizes / sizes.mean())
    losses = layer.aux_losses(r)
    torch.testing.assert_close(losses["intra_group_aux_loss"], torch.as_tensor(want).float(), rtol=1e-5, atol=1e-7)
    assert losses["group_aux_loss"].item() == 0.0
    group_of = torch.tensor(cfg.expert_group_ids())
    for t in range(x.shape[0]):
        assert set(r.group_mask_TG[t].nonzero().flatten().tolist()) == set(group_of[top.indices[t]].tolist())


def test_flat_router_top_p_selects_the_smallest_set_reaching_p():
    layer = _flat(top_k=6, top_p=0.4, router_entropy_coeff=1e-3)
    x = _x(T=64)
    r = layer.router(x)
    probs = (x @ layer.router.gate.weight.t()).softmax(-1)
    for t in range(x.shape[0]):
        order = probs[t].argsort(descending=True).tolist()
        want, total = [], 0.0
        for e in order[:6]:  # add experts by decreasing probability until the sum reaches p
            want.append(e)
            total += probs[t, e].item()
            if total >= 0.4:
                break
        got = r.expert_idx_TK[t][r.keep_TK[t]].tolist()
        assert got == want
        w = r.weights_TK[t]
        assert torch.allclose(w[r.keep_TK[t]], probs[t, want] / probs[t, want].sum(), atol=1e-6)
        assert (w[~r.keep_TK[t]] == 0).all()
    assert 1 < r.keep_TK.sum(-1).float().mean() < 6  # genuinely dynamic on this input
    # The layer runs and dispatches only the used slots.
    layer.train()
    out = layer(x.view(2, 32, D))
    assert out.shape == (2, 32, D)
    stats = layer.stats.pop()
    assert stats["tokens_per_expert"].sum().item() == r.keep_TK.sum().item()
    assert "router_entropy" in stats


def test_flat_router_config_errors():
    with pytest.raises(ConfigError, match="group_aux_coeff"):
        make_moe(router="flat", k_group=1).validate(D)
    with pytest.raises(ConfigError, match="top_p"):
        make_moe(top_p=0.5).validate(D)
    with pytest.raises(ConfigError, match="capacity_factor"):
        make_moe(router="flat", k_group=1, group_aux_coeff=0.0, top_p=0.5, capacity_factor=1.0).validate(D)
    with pytest.raises(ConfigError, match="router_entropy_coeff"):
        make_moe(router="flat", k_group=1, group_aux_coeff=0.0, router_entropy_coeff=0.1).validate(D)


@pytest.mark.parametrize("preset", ["balance_moe", "balance_mohge", "balance_hmoe"])
def test_comparison_presets_compose_and_validate(preset):
    from mohge.train.hydra_config import compose_config

    cfg = compose_config(preset)
    cfg.validate()
    assert cfg.train.global_batch_size * cfg.train.seq_len * cfg.train.steps == 16 * 64 * 160  # same budget


def test_balance_buffers_are_checkpoint_entries_only_when_on():
    from mohge.model.transformer import build_model
    from mohge.train.checkpoint import model_entries
    from mohge.train.hydra_config import compose_config

    names = ("expert_bias", "group_bias", "global_expert_slots", "global_group_slots")
    default = build_model(compose_config("tiny_mohge").model, "meta")
    assert not [k for k in model_entries(default) if k.endswith(names)]  # default checkpoints unchanged
    cfg = compose_config("tiny_mohge", ["model.moe.balance_scope=global_batch", "model.moe.bias_update_rate=0.01",
                                        "model.moe.group_bias_update_rate=0.01"])
    model = build_model(cfg.model, "meta")
    model.to_empty(device="cpu")
    model.init_weights(0)
    entries = model_entries(model)
    for layer in ("0", "1"):
        assert entries[f"layers.{layer}.ffn.router.expert_bias"].abs().sum() == 0
        assert entries[f"layers.{layer}.ffn.router.group_bias"].shape == (3,)
        torch.testing.assert_close(entries[f"layers.{layer}.ffn.global_expert_slots"], torch.full((12,), 3 / 12))
        torch.testing.assert_close(entries[f"layers.{layer}.ffn.global_group_slots"], torch.full((3,), 2 / 3))
