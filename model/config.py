"""Structured configs for the model: the schema Hydra validates against, plus derived numbers.

Derived numbers (parameter counts, FLOPs per token) are methods here so the planner, the logger
and the tests agree on one definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from mohge.train.errors import ConfigError  # re-exported: defined in the one errors module

TOPK_MODES = ("global", "per_group")
COMBINE_MODES = ("renormalize", "authors")
EXPERT_COMPUTE = ("auto", "loop", "grouped", "ragged")
ALLOCATIONS = ("all_size", "group_coupled")
FFN_TYPES = ("dense", "mohge")
ATTENTIONS = ("gqa", "mla")
ROPE_SCALINGS = ("none", "linear", "yarn")
BALANCE_SCOPES = ("micro_batch", "global_batch", "sequence")
ROUTERS = ("group", "flat")


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


@dataclass
class ExpertGroupConfig:
    """One size group: `num_experts` SwiGLU experts of width `ffn_hidden_size`."""

    num_experts: int = 8
    ffn_hidden_size: int = 512


@dataclass
class MoEConfig:
    """An MoHGE layer: groups of experts, two-level routing and the method's auxiliary losses.

    A homogeneous top-k MoE is the one-group case (k_group=1).
    """

    groups: list[ExpertGroupConfig] = field(default_factory=lambda: [ExpertGroupConfig()])
    k_group: int = 1  # groups kept per token (top K_g of the sigmoid group scores)
    top_k: int = 2  # experts per token, taken across the kept groups
    topk_mode: str = "global"  # "global": top_k across kept groups; "per_group": top_k/k_group in each
    combine: str = "renormalize"  # "renormalize": selected s / sum; "authors": softmax over selected s
    num_shared_experts: int = 0
    shared_ffn_hidden_size: int = 0  # width of each always-on shared expert
    group_aux_coeff: float = 1e-5  # a_G of the group-wise auxiliary loss
    group_aux_start_fraction: float = 0.5  # fraction of train.steps after which a_G switches on
    group_aux_width_interval: float = 1024.0  # D in w_g = (W_g - W_min + D) / D
    intra_aux_coeff: float = 4e-3  # a_I of the intra-group experts auxiliary loss
    z_loss_coeff: float = 0.0  # router z-loss on the expert logits
    router_init_std: float = 0.02  # std of the router weights' normal init (group and expert gates)
    expert_compute: str = "auto"  # "loop" (reference), "grouped" (padded, sync-free), "ragged" (exact, one op per projection), "auto"
    allocation: str = "all_size"  # expert placement over EP ranks: "all_size" | "group_coupled"
    capacity_factor: Optional[float] = None  # None: dropless
    # Where the balance losses count routed slots: "micro_batch" (each forward's own tokens),
    # "global_batch" (the previous optimizer step's whole global batch, see docs/balancing.md),
    # "sequence" (each sequence on its own, DeepSeek-V3's sequence-wise loss).
    balance_scope: str = "micro_batch"
    bias_update_rate: float = 0.0  # aux-loss-free per-expert selection bias step (0 = off)
    group_bias_update_rate: float = 0.0  # aux-loss-free per-group selection bias step (0 = off)
    router: str = "group"  # "group": MoHGE two-level routing; "flat": HMoE, one softmax over all experts
    top_p: Optional[float] = None  # router=flat: HMoE top-p threshold (top_k caps experts per token)
    router_entropy_coeff: float = 0.0  # router=flat with top_p: weight of the router-entropy loss

    # ---- derived -------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_experts(self) -> int:
        return sum(g.num_experts for g in self.groups)

    @property
    def group_widths(self) -> list[int]:
        return [g.ffn_hidden_size for g in self.groups]

    def expert_group_ids(self) -> list[int]:
        """Group index of every global expert id (experts are numbered group by group)."""
        return [gi for gi, g in enumerate(self.groups) for _ in range(g.num_experts)]

    def group_offsets(self) -> list[int]:
        """First global expert id of each group, plus the total at the end."""
        offsets = [0]
        for g in self.groups:
            offsets.append(offsets[-1] + g.num_experts)
        return offsets

    def width_weights(self) -> list[float]:
        """w_g = (W_g - W_min + D) / D: the group-wise loss's cost weight of each group."""
        w_min = min(self.group_widths)
        d = self.group_aux_width_interval
        return [(w - w_min + d) / d for w in self.group_widths]

    def routed_expert_params(self, d_model: int) -> int:
        """Parameters of all routed experts (three d_model x F matrices each, SwiGLU)."""
        return sum(3 * d_model * g.ffn_hidden_size * g.num_experts for g in self.groups)

    def shared_expert_params(self, d_model: int) -> int:
        return 3 * d_model * self.shared_ffn_hidden_size * self.num_shared_experts

    def router_params(self, d_model: int) -> int:
        return d_model * (self.num_groups + self.num_experts)

    def expected_active_width(self, group_fractions: Optional[Sequence[float]] = None) -> float:
        """Expected routed FFN width a token runs through (sum over its k experts).

        `group_fractions[g]` is the share of the token's k expert slots that land in group g
        (sums to 1). Default: uniform over groups, which is what an untrained router gives.
        """
        if group_fractions is None:
            group_fractions = [1.0 / self.num_groups] * self.num_groups
        if len(group_fractions) != self.num_groups:
            raise ConfigError(
                f"group_fractions: got {len(group_fractions)} values for {self.num_groups} groups"
            )
        total = float(sum(group_fractions))
        return self.top_k * sum(f / total * w for f, w in zip(group_fractions, self.group_widths))

    def validate(self, d_model: int, prefix: str = "model.moe") -> None:
        _require(self.num_groups >= 1, f"{prefix}.groups", "needs at least one group")
        for i, g in enumerate(self.groups):
            _require(g.num_experts >= 1, f"{prefix}.groups[{i}].num_experts", "must be >= 1")
            _require(g.ffn_hidden_size >= 1, f"{prefix}.groups[{i}].ffn_hidden_size", "must be >= 1")
        _require(
            1 <= self.k_group <= self.num_groups,
            f"{prefix}.k_group",
            f"{self.k_group} is outside 1..{self.num_groups} (the number of groups)",
        )
        _require(self.topk_mode in TOPK_MODES, f"{prefix}.topk_mode", f"must be one of {TOPK_MODES}")
        _require(self.combine in COMBINE_MODES, f"{prefix}.combine", f"must be one of {COMBINE_MODES}")
        _require(
            self.expert_compute in EXPERT_COMPUTE,
            f"{prefix}.expert_compute",
            f"must be one of {EXPERT_COMPUTE}",
        )
        if self.expert_compute == "grouped":
            for i, g in enumerate(self.groups):
                _require(
                    g.ffn_hidden_size % 8 == 0,
                    f"{prefix}.groups[{i}].ffn_hidden_size",
                    "must be a multiple of 8 for expert_compute=grouped (grouped GEMM needs 16-byte "
                    "aligned rows); use expert_compute=ragged (exact, any width) or pad the width",
                )
            _require(d_model % 8 == 0, "model.d_model",
                     "must be a multiple of 8 for expert_compute=grouped; use expert_compute=ragged (any width)")
        _require(self.allocation in ALLOCATIONS, f"{prefix}.allocation", f"must be one of {ALLOCATIONS}")
        _require(self.top_k >= 1, f"{prefix}.top_k", "must be >= 1")
        smallest_kept = sum(sorted(g.num_experts for g in self.groups)[: self.k_group])
        if self.router == "flat":
            _require(self.top_k <= self.num_experts, f"{prefix}.top_k", f"must be <= {self.num_experts} experts")
        elif self.topk_mode == "global":
            _require(
                self.top_k <= smallest_kept,
                f"{prefix}.top_k",
                f"{self.top_k} experts cannot always be found in the {self.k_group} kept group(s), which "
                f"may hold only {smallest_kept} experts; lower top_k or raise k_group",
            )
        else:
            _require(
                self.top_k % self.k_group == 0,
                f"{prefix}.top_k",
                f"per_group routing takes top_k/k_group experts in each kept group, so top_k "
                f"({self.top_k}) must be a multiple of k_group ({self.k_group})",
            )
            per_group = self.top_k // self.k_group
            fewest = min(g.num_experts for g in self.groups)
            _require(
                per_group <= fewest,
                f"{prefix}.top_k",
                f"per_group routing takes {per_group} experts in each kept group but a group holds "
                f"only {fewest}; lower top_k or raise k_group",
            )
        _require(self.num_shared_experts >= 0, f"{prefix}.num_shared_experts", "must be >= 0")
        if self.num_shared_experts:
            _require(
                self.shared_ffn_hidden_size >= 1,
                f"{prefix}.shared_ffn_hidden_size",
                "must be set when num_shared_experts > 0",
            )
        _require(
            0.0 <= self.group_aux_start_fraction <= 1.0,
            f"{prefix}.group_aux_start_fraction",
            "must lie in [0, 1] (fraction of train.steps)",
        )
        _require(self.group_aux_width_interval > 0, f"{prefix}.group_aux_width_interval", "must be > 0")
        for name in ("group_aux_coeff", "intra_aux_coeff", "z_loss_coeff"):
            _require(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")
        if self.capacity_factor is not None:
            _require(self.capacity_factor > 0, f"{prefix}.capacity_factor", "must be > 0 or null (dropless)")
        self._validate_balance(prefix)

    def _validate_balance(self, prefix: str) -> None:
        """Balance scope, aux-loss-free bias and the HMoE flat router (docs/balancing.md)."""
        _require(self.router_init_std > 0, f"{prefix}.router_init_std", "must be > 0")
        _require(self.balance_scope in BALANCE_SCOPES, f"{prefix}.balance_scope", f"must be one of {BALANCE_SCOPES}")
        _require(self.router in ROUTERS, f"{prefix}.router", f"must be one of {ROUTERS}")
        for name in ("bias_update_rate", "group_bias_update_rate", "router_entropy_coeff"):
            _require(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")
        if self.group_bias_update_rate > 0 and self.router != "flat":  # router=flat: reported with its others below
            _require(
                self.router == "group" and self.k_group < self.num_groups,
                f"{prefix}.group_bias_update_rate",
                "steers group selection, which only happens with router=group and k_group < number of groups; "
                "set it to 0",
            )
        if self.router == "flat":  # every conflicting field in one line, so the config is fixed in one go
            checks = [
                (self.k_group == 1, "k_group", "router=flat selects no groups; leave k_group at 1"),
                (self.topk_mode == "global", "topk_mode", "router=flat takes the global top_k; leave topk_mode=global"),
                (self.combine == "renormalize", "combine", "router=flat renormalises the selected softmax "
                 "probabilities (the same as a softmax over their logits); leave combine=renormalize"),
                (self.group_aux_coeff == 0, "group_aux_coeff", "router=flat has no group-wise loss (the "
                 "parameter-penalty loss is weighted by intra_aux_coeff); set group_aux_coeff=0"),
                (self.group_bias_update_rate == 0, "group_bias_update_rate", "steers group selection, which "
                 "router=flat does not do; set it to 0"),
                (self.router_entropy_coeff == 0 or self.top_p is not None, "router_entropy_coeff",
                 "the router-entropy loss is HMoE's top-p companion; set top_p or router_entropy_coeff=0"),
            ]
            if self.top_p is not None:
                checks += [(0 < self.top_p <= 1, "top_p", "must lie in (0, 1]"),
                           (self.capacity_factor is None, "capacity_factor",
                            "top-p routing is dropless here; set capacity_factor=null or top_p=null")]
            failed = [f"{prefix}.{name}: {message}" for ok, name, message in checks if not ok]
            if failed:
                raise ConfigError("; ".join(failed) if len(failed) == 1 else
                                  f"{prefix}.router=flat conflicts with {len(failed)} fields: " + "; ".join(failed))
        else:
            _require(self.top_p is None, f"{prefix}.top_p", "top-p routing needs router=flat; set top_p=null")
        if self.router_entropy_coeff > 0:
            _require(self.router == "flat" and self.top_p is not None, f"{prefix}.router_entropy_coeff",
                     "the router-entropy loss is HMoE's top-p companion; needs router=flat and top_p")


@dataclass
class RopeScalingConfig:
    """RoPE context scaling: "none", "linear" (positions / factor) or "yarn" (see model/rope.py)."""

    type: str = "none"
    factor: float = 1.0  # context extension factor s
    original_max_seq_len: int = 4096  # context the unscaled frequencies were meant for (yarn)
    beta_fast: float = 32.0  # yarn: rotations in the original context above which dims extrapolate
    beta_slow: float = 1.0  # yarn: rotations below which dims interpolate fully
    mscale: float = 1.0  # yarn: magnitude term mscale(s, mscale) on the cos/sin table ...
    mscale_all_dim: float = 0.0  # ... divided by mscale(s, mscale_all_dim), which (if > 0) also
    # multiplies the softmax scale squared (DeepSeek-V2)

    def validate(self, prefix: str = "model.rope_scaling") -> None:
        _require(self.type in ROPE_SCALINGS, f"{prefix}.type", f"must be one of {ROPE_SCALINGS}")
        if self.type == "none":
            _require(self == RopeScalingConfig(), prefix, "fields are set but type=none; set type=linear|yarn "
                     "or drop them")
            return
        _require(self.factor >= 1.0, f"{prefix}.factor", f"must be >= 1 (got {self.factor})")
        if self.type == "linear":
            _require(
                (self.original_max_seq_len, self.beta_fast, self.beta_slow, self.mscale, self.mscale_all_dim)
                == (4096, 32.0, 1.0, 1.0, 0.0),
                prefix, "original_max_seq_len/beta_*/mscale* only apply to type=yarn",
            )
            return
        _require(self.original_max_seq_len >= 1, f"{prefix}.original_max_seq_len", "must be >= 1")
        _require(self.beta_fast > self.beta_slow > 0, f"{prefix}.beta_fast",
                 f"need beta_fast > beta_slow > 0 (got {self.beta_fast}, {self.beta_slow})")
        _require(self.mscale >= 0 and self.mscale_all_dim >= 0, f"{prefix}.mscale", "must be >= 0")


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2): K and V come from one low-rank latent per token,
    plus a rotary key shared by all heads; Q is optionally compressed too."""

    q_lora_rank: int = 0  # 0: full-rank query projection (the authors' A3B); > 0: compressed query
    kv_lora_rank: int = 512  # width of the compressed KV latent
    qk_nope_head_dim: int = 128  # per-head query/key dims without RoPE
    qk_rope_head_dim: int = 64  # per-head query dims with RoPE (the key's is shared by all heads)
    v_head_dim: int = 128
    qk_norm: bool = True  # RMSNorm on the q and kv latents (megatron's --qk-layernorm with MLA)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self, prefix: str = "model.mla") -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _require(getattr(self, name) >= 1, f"{prefix}.{name}", "must be >= 1")
        _require(self.q_lora_rank >= 0, f"{prefix}.q_lora_rank", "must be >= 0 (0: no query compression)")
        _require(self.qk_rope_head_dim % 2 == 0, f"{prefix}.qk_rope_head_dim", "must be even for RoPE")

    def params(self, d_model: int, n_heads: int) -> int:
        """Parameters of one MLA block (projections and latent norms)."""
        q = (d_model * self.q_lora_rank + self.q_lora_rank * self.qk_norm
             + self.q_lora_rank * n_heads * self.qk_head_dim) if self.q_lora_rank else d_model * n_heads * self.qk_head_dim
        kv = d_model * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank * self.qk_norm
        kv += self.kv_lora_rank * n_heads * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + n_heads * self.v_head_dim * d_model


@dataclass
class ModelConfig:
    """A Llama-style decoder; `ffn_type=mohge` swaps the FFN of layers >= first_k_dense for MoHGE."""

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_hidden_size: int = 1024  # width of the dense FFN layers
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    ffn_type: str = "mohge"
    first_k_dense: int = 0
    moe: MoEConfig = field(default_factory=MoEConfig)
    attention: str = "gqa"  # "gqa" (grouped-query) | "mla" (multi-head latent, dims in `mla`)
    mla: MLAConfig = field(default_factory=MLAConfig)  # used only with attention=mla
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    qk_norm: bool = False  # gqa: RMSNorm over head_dim of q and k before RoPE (mla: model.mla.qk_norm)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.ffn_type == "mohge" and layer_id >= self.first_k_dense

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    def validate(self) -> None:
        _require(self.vocab_size >= 2, "model.vocab_size", "must be >= 2")
        _require(self.n_layers >= 1, "model.n_layers", "must be >= 1")
        _require(self.n_heads >= 1, "model.n_heads", "must be >= 1")
        _require(
            self.d_model % self.n_heads == 0,
            "model.d_model",
            f"{self.d_model} is not divisible by model.n_heads={self.n_heads}",
        )
        _require(self.head_dim % 2 == 0, "model.d_model", "d_model / n_heads must be even for RoPE")
        _require(
            self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
            "model.n_kv_heads",
            f"{self.n_kv_heads} must divide model.n_heads={self.n_heads} (grouped-query attention)",
        )
        _require(self.ffn_type in FFN_TYPES, "model.ffn_type", f"must be one of {FFN_TYPES}")
        _require(
            0 <= self.first_k_dense <= self.n_layers,
            "model.first_k_dense",
            f"must lie in 0..n_layers ({self.n_layers})",
        )
        _require(self.max_seq_len >= 1, "model.max_seq_len", "must be >= 1")
        if self.ffn_type == "mohge":
            self.moe.validate(self.d_model)
        _require(self.attention in ATTENTIONS, "model.attention", f"must be one of {ATTENTIONS}")
        if self.attention == "mla":
            self.mla.validate()
            _require(self.n_kv_heads == self.n_heads, "model.n_kv_heads",
                     "MLA has one key/value per query head: set n_kv_heads = n_heads with attention=mla")
            _require(not self.qk_norm, "model.qk_norm", "applies to attention=gqa; MLA normalises its latents "
                     "with model.mla.qk_norm, so set model.qk_norm=false")
        else:
            _require(self.mla == MLAConfig(), "model.mla", "is set but model.attention=gqa; set "
                     "model.attention=mla or drop the model.mla overrides")
        self.rope_scaling.validate()

    # ---- parameter counts and FLOPs ---------------------------------------------------
    def _attention_params(self) -> int:
        if self.attention == "mla":
            return self.mla.params(self.d_model, self.n_heads)
        kv_dim = self.n_kv_heads * self.head_dim
        return self.d_model * self.d_model * 2 + self.d_model * kv_dim * 2 + 2 * self.head_dim * self.qk_norm

    def _dense_ffn_params(self) -> int:
        return 3 * self.d_model * self.ffn_hidden_size

    def _moe_ffn_params(self) -> int:
        m = self.moe
        return m.routed_expert_params(self.d_model) + m.shared_expert_params(self.d_model) + m.router_params(
            self.d_model
        )

    def num_params(self) -> int:
        """Every parameter the model holds (embeddings counted once when tied)."""
        per_layer_common = self._attention_params() + 2 * self.d_model  # two RMSNorm weights
        ffn = sum(
            self._moe_ffn_params() if self.is_moe_layer(i) else self._dense_ffn_params()
            for i in range(self.n_layers)
        )
        embed = self.vocab_size * self.d_model
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return embed + head + self.n_layers * per_layer_common + ffn + self.d_model

    def num_routed_expert_params(self) -> int:
        return self.num_moe_layers * self.moe.routed_expert_params(self.d_model)

    def active_params_per_token(self, group_fractions: Optional[Sequence[float]] = None) -> float:
        """Parameters a token touches: everything but the routed experts it skips.

        Routed experts count by the expected width the token runs through (see
        MoEConfig.expected_active_width), so heterogeneous groups give a routing-dependent number.
        """
        total = self.num_params()
        if self.num_moe_layers == 0:
            return float(total)
        active_routed = 3 * self.d_model * self.moe.expected_active_width(group_fractions)
        skipped = self.moe.routed_expert_params(self.d_model) - active_routed
        return float(total - self.num_moe_layers * skipped)

    def flops_per_token(self, seq_len: int, group_fractions: Optional[Sequence[float]] = None) -> float:
        """Training FLOPs per token (forward + backward = 3x forward).

        Matmuls count 2 FLOPs per multiply-add over the active non-embedding parameters plus the
        output head, and causal attention adds 2 * seq_len/2 * attention_core_width() per layer
        (QK^T and AV).
        """
        active = self.active_params_per_token(group_fractions)
        embed_in = self.vocab_size * self.d_model  # a lookup, not a matmul
        if self.tie_embeddings:
            active += self.vocab_size * self.d_model  # the tied head still multiplies
        matmul = 2 * (active - embed_in)
        attention = self.n_layers * 2 * (seq_len / 2) * self.attention_core_width()
        return 3 * (matmul + attention)

    def attention_core_width(self) -> int:
        """Summed head dims of QK^T and AV: n_heads * (qk head dim + v head dim)."""
        if self.attention == "mla":
            return self.n_heads * (self.mla.qk_head_dim + self.mla.v_head_dim)
        return 2 * self.d_model

    @property
    def rope_dim(self) -> int:
        """Dims RoPE rotates per head: the whole head (gqa) or qk_rope_head_dim (mla)."""
        return self.mla.qk_rope_head_dim if self.attention == "mla" else self.head_dim
