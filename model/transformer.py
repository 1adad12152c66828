"""The decoder: embedding -> blocks (attention + dense FFN or MoHGE) -> norm -> output head.

Built on `meta`, moved with `to_empty`, then `init_weights(seed)`: every parameter's initial value
is a function of (seed, parameter name, element index) and each process generates only the part
it holds (model/init.py), so any parallel layout that keeps parameter names starts from the same
weights. Pipeline stages delete the
modules they do not run (the embedding, some blocks, the head) and keep the names of the rest.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mohge.model.config import ModelConfig
from mohge.model.attention import MultiLatentAttention
from mohge.model.init import fill_local, param_key
from mohge.model.layers import Attention, FeedForward
from mohge.model.loss import chunked_linear_cross_entropy
from mohge.model.rope import rope_cache, softmax_scale_factor
from mohge.model.moe.balance import init_balance_buffers
from mohge.model.moe.layer import MoHGELayer


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, expert_compute: str = "loop"):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = build_attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.is_moe_layer(layer_id):
            self.ffn: nn.Module = MoHGELayer(cfg.d_model, cfg.moe, expert_compute)
        else:
            self.ffn = FeedForward(cfg.d_model, cfg.ffn_hidden_size)

    def forward(self, x_BSD: torch.Tensor, rope_SDh: torch.Tensor) -> torch.Tensor:
        h = x_BSD + self.attention(self.attention_norm(x_BSD), rope_SDh)
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    """tokens [B, S] -> logits [B, S, V] (or hidden states on a pipeline stage without the head)."""

    def __init__(self, cfg: ModelConfig, expert_compute: str = "loop"):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(cfg, i, expert_compute) for i in range(cfg.n_layers)}
        )
        self.norm: nn.RMSNorm | None = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        # A tied head multiplies by the embedding table directly: a shared Parameter would come
        # apart under to_empty() and under per-stage sharding.
        self.output: nn.Linear | None = (
            None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        )
        self.loss_chunk_tokens = 0  # > 0: forward(tokens, labels) returns the chunked loss
        self.register_buffer("rope", _rope_table(cfg), persistent=False)
        self.positions: torch.Tensor | None = None  # set by context parallel (parallel/context_parallel.py)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """With `labels` and `loss_chunk_tokens` set: the mean LM loss, logits never whole."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        # context parallel: this process holds the tokens at `positions` of each sequence
        rope = self.rope if self.positions is None else self.rope[self.positions]
        for layer in self.layers.values():
            h = layer(h, rope)
        if self.norm is None:  # a pipeline stage before the last returns hidden states
            return h
        h = self.norm(h)
        if labels is not None and self.loss_chunk_tokens:
            w = self.output.weight if self.output is not None else self.tok_embeddings.weight
            return chunked_linear_cross_entropy(h.flatten(0, 1), w, labels.flatten(), self.loss_chunk_tokens)
        return self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)

    # ---- initialisation -----------------------------------------------------------------
    def init_weights(self, seed: int) -> int:
        """Deterministic, layout-independent initial values (see the module docstring); returns the
        number of elements this process generated."""
        device = next(self.parameters()).device
        self.rope = _rope_table(self.cfg, device)
        for module in self.modules():  # index tables left empty by to_empty()
            if hasattr(module, "reset_buffers"):
                module.reset_buffers()
        generated = 0
        with torch.no_grad():
            for name, module, param in _named_params_with_owner(self):
                rows = getattr(module, "expert_rows", None)
                generated += fill_local(param, param_key(name, seed), init_std(name, self.cfg),
                                        full_shape(module, param), rows)
        init_balance_buffers(self)
        return generated

    def num_params(self) -> int:
        """Distinct parameters of the whole model, as ModelConfig.num_params() counts them, also
        when this process holds only a part (expert or tensor shards)."""
        return sum(math.prod(full_shape(module, p)) for _, module, p in _named_params_with_owner(self))


def build_attention(cfg: ModelConfig) -> nn.Module:
    """The block's attention: grouped-query (gqa) or multi-head latent (mla)."""
    scale = softmax_scale_factor(cfg.rope_scaling)
    if cfg.attention == "mla":
        return MultiLatentAttention(cfg.d_model, cfg.n_heads, cfg.mla, cfg.norm_eps, scale)
    return Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, scale, cfg.qk_norm, cfg.norm_eps)


def _rope_table(cfg: ModelConfig, device=None) -> torch.Tensor:
    return rope_cache(cfg.max_seq_len, cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling, device=device)


def _named_params_with_owner(model: nn.Module):
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            yield (f"{mod_name}.{p_name}" if mod_name else p_name), module, param


def full_shape(module: nn.Module, param: torch.Tensor) -> tuple[int, ...]:
    """Shape of the whole parameter: expert parallel keeps `expert_rows` of a group's experts on
    the module (`full_num_experts` in all); a DTensor knows its global shape."""
    if getattr(module, "expert_rows", None) is not None:
        return (module.full_num_experts, *param.shape[1:])
    return tuple(param.shape)


def init_std(name: str, cfg: ModelConfig) -> float | None:
    """Standard deviation of parameter `name`'s normal initialisation; None: ones (norm weights)."""
    if name.endswith("norm.weight"):
        return None
    std = cfg.init_std
    if ".router." in name:
        std = cfg.moe.router_init_std
    if name.endswith(("attention.wo.weight", ".w2.weight", ".w2")):
        std = std / math.sqrt(2 * cfg.n_layers)  # residual-branch outputs, as GPT-2 / Megatron
    return std


def initial_value(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The initial value of parameter `name` (whole shape), on CPU in fp32."""
    value = torch.empty(shape)
    fill_local(value, param_key(name, seed), init_std(name, cfg), shape)
    return value


def build_model(cfg: ModelConfig, device: str | torch.device = "meta", expert_compute: str = "loop") -> Transformer:
    """Builds the model on `device` without initialising it (call init_weights after moving)."""
    with torch.device(device):
        return Transformer(cfg, expert_compute)
