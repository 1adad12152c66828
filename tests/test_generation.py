"""KV-cache generation of the standalone module: token-identical to recomputing the prefix."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from mohge.train.hydra_config import compose_config

PATH = Path(__file__).parents[1] / "launch" / "modeling.py"


def _standalone():
    spec = importlib.util.spec_from_file_location("standalone_modeling_gen", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(preset: str, dtype=torch.float64):
    """A random standalone model with weights large enough that next-token logits are well apart."""
    modeling = _standalone()
    model = modeling.MoHGEForCausalLM(asdict(compose_config(preset, []).model))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.randn(p.shape, generator=gen) * 0.3)
    return modeling, model.to(dtype).eval()


def _left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    tokens = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return tokens, mask


PROMPTS = [[5, 17, 99, 3, 250, 8, 41], [200, 1, 64], [7, 7, 7, 7, 12]]


@pytest.mark.parametrize("preset", ["tiny_mohge", "tiny_moe"])
def test_cached_greedy_batch_equals_each_prompt_alone_without_cache(preset):
    _, model = _model(preset)
    tokens, mask = _left_pad(PROMPTS)
    batched = model.generate(tokens, 12, attention_mask=mask, use_cache=True)
    width = tokens.shape[1]
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate(torch.tensor([prompt]), 12, use_cache=False)
        assert batched[row, width:].tolist() == alone[0, len(prompt):].tolist(), row
    assert len({tuple(r) for r in batched[:, width:].tolist()}) == len(PROMPTS)  # not a constant output


def test_cached_logits_equal_full_forward_per_step():
    """Prefill + one-token steps give the full forward's logits at every position (fp32)."""
    modeling, model = _model("tiny_mohge", torch.float32)
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    cache = modeling.KVCache()
    steps = [model(tokens[:, :4], cache=cache)]
    steps += [model(tokens[:, i:i + 1], cache=cache) for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 10


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampling_with_cache_equals_sampling_without(top_p):
    _, model = _model("tiny_mohge")
    tokens, mask = _left_pad(PROMPTS)
    runs = [model.generate(tokens, 10, temperature=0.9, top_p=top_p, attention_mask=mask, use_cache=cache,
                           generator=torch.Generator().manual_seed(7)) for cache in (True, False)]
    assert torch.equal(runs[0], runs[1])
    greedy = model.generate(tokens, 10, attention_mask=mask)
    assert not torch.equal(runs[0], greedy)  # sampling did sample


def test_top_p_keeps_only_the_nucleus():
    modeling = _standalone()
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(modeling.sample(logits, 1.0, 0.7, torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is never drawn
    assert int(modeling.sample(logits, 0.0)) == 0


def test_eos_stops_a_row_and_length_is_checked():
    _, model = _model("tiny_mohge")
    tokens = torch.tensor([PROMPTS[0]])
    first = int(model.generate(tokens, 1)[0, -1])
    out = model.generate(tokens, 5, eos_token_id=first, pad_token_id=255)
    assert out[0, len(PROMPTS[0]):].tolist() == [first, 255, 255, 255, 255]
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(tokens, 64)
