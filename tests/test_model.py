"""The decoder: deterministic, layout-independent init; shapes; attention masking; tied head."""

from __future__ import annotations

import torch

from mohge.model.transformer import build_model, initial_value
from mohge.train.hydra_config import compose_config


def _model(cfg, seed=0):
    model = build_model(cfg, "meta")
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model


def test_init_is_deterministic_and_seed_dependent():
    cfg = compose_config("tiny_mohge").model
    a, b, c = _model(cfg, 0), _model(cfg, 0), _model(cfg, 1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


def test_init_value_depends_only_on_name_and_seed():
    """A parallel layout that keeps names gets the same values from a part of the model."""
    cfg = compose_config("tiny_mohge").model
    model = _model(cfg, 3)
    experts = model.layers["1"].ffn.experts  # packed stacks draw their values per old group name
    n, f = cfg.moe.groups[2].num_experts, cfg.moe.groups[2].ffn_hidden_size
    w1 = initial_value("layers.1.ffn.experts.groups.2.w1", (n, f, cfg.d_model), cfg, 3)
    first = experts.expert_ids.index((2, 0))
    for r in range(n):
        assert torch.equal(experts.expert_weights(first + r)[0], w1[r])


def test_forward_shapes_and_causality():
    cfg = compose_config("tiny_mohge").model
    model = _model(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 10))
    logits = model(tokens)
    assert logits.shape == (2, 10, cfg.vocab_size)
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % cfg.vocab_size
    # Position t sees only tokens <= t: the first 7 positions' logits must not change.
    # (MoE routing is per token, so no token can influence another through the experts.)
    torch.testing.assert_close(model(changed)[:, :7], logits[:, :7])


def test_tied_head_uses_embedding_table():
    cfg = compose_config("demo").model
    assert cfg.tie_embeddings
    model = _model(cfg)
    assert model.output is None and model.num_params() == cfg.num_params()
    tokens = torch.zeros(1, 4, dtype=torch.long)  # only token 0 is looked up...
    model(tokens)[..., 5].sum().backward()
    # ...yet row 5 of the table gets a gradient: the head multiplies by the same table.
    assert model.tok_embeddings.weight.grad[5].abs().sum() > 0
