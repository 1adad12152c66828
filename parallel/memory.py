"""Memory planner: each rank's bytes of parameters, gradients and AdamW states for a layout, and an
activation estimate.

The parameter figures are counted, not modelled: the model is built on meta, pruned to the rank's
pipeline stages and cut to its experts by the same functions parallelize uses, then every
parameter is split the way tensor parallel and FSDP split it (torch.chunk sizes along the shard
dimension, as FSDP2 and DTensor do). `tests/test_memory.py` checks them against the local shard
sizes of a model built under real gloo layouts. Bytes count the unpadded local shards (what
`to_local()`, the optimizer and the checkpoint see); FSDP2 pads each shard's storage up to
ceil(size / n) rows, at most one row per tensor more.

Shape legend: T tokens per micro-batch on a rank, D model dim, V vocabulary, F ffn width,
E experts, G groups, H heads, k experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mohge.parallel.data_parallel import expert_shard_dim, fsdp_shard_dim
from mohge.parallel.dims import ParallelDims

# Tensor-parallel shard dimension of every parameter the plan in tensor_parallel.py shards
# (column-parallel weights on dim 0, row-parallel on dim 1, the embedding row-wise over the vocab).
TP_SHARD_DIM = {
    "tok_embeddings.weight": 0,
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
}
TP_DENSE_FFN = {"ffn.w1.weight": 0, "ffn.w3.weight": 0, "ffn.w2.weight": 1}


def is_expert_param(name: str) -> bool:
    return ".experts." in name


def tp_shard_dim(name: str) -> int | None:
    """Dimension tensor parallel shards `name` along, or None (replicated over tp)."""
    for suffix, dim in TP_SHARD_DIM.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    if ".ffn.shared." not in name and ".experts." not in name:
        for suffix, dim in TP_DENSE_FFN.items():
            if name.endswith("." + suffix):
                return dim
    return None


def chunk_len(size: int, n: int, i: int) -> int:
    """Length of chunk i of torch.chunk(size, n): ceil-sized chunks, the last ones short or empty."""
    c = -(-size // n)
    return max(0, min(c, size - i * c))


@dataclass
class RankMemory:
    """One rank's counted state (elements and bytes)."""

    rank: int
    coords: dict
    param_elems: int = 0
    expert_elems: int = 0
    num_tensors: int = 0
    param_bytes: int = 0
    grad_bytes: int = 0
    optim_bytes: int = 0
    activation_bytes: int = 0
    activation_bytes_checkpointed: dict = field(default_factory=dict)

    @property
    def state_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optim_bytes

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("rank", "param_elems", "expert_elems", "num_tensors", "param_bytes",
                                               "grad_bytes", "optim_bytes", "state_bytes", "activation_bytes",
                                               "activation_bytes_checkpointed")}


def held_params(cfg, dims: ParallelDims, pp_rank: int, ep_rank: int) -> list[tuple[str, tuple, tuple, bool]]:
    """(name, shape held before tp/FSDP splits, whole shape, is expert) of every parameter of the
    pipeline rank's stages and the EP rank's experts: the model is built on meta and cut by the
    functions parallelize uses."""
    from mohge.model.moe.layer import moe_layers
    from mohge.model.transformer import build_model, full_shape
    from mohge.parallel.allocation import allocate
    from mohge.parallel.expert_parallel import shard_experts
    from mohge.parallel.pipeline import split_model

    model = build_model(cfg.model, "meta")
    p = cfg.parallel
    if dims.pp > 1:
        split_model(model, pp_rank, dims.pp, p.pp_virtual_stages, p.pp_layer_split)
    if dims.ep > 1:
        placement = allocate(cfg.model.moe, dims.ep, cfg.model.moe.allocation)
        for _, layer in moe_layers(model):
            shard_experts(layer, placement, ep_rank)
    out = []
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            out.append((name, tuple(param.shape), tuple(full_shape(module, param)), is_expert_param(name)))
    return out


def local_shapes(cfg, dims: ParallelDims, rank: int, experts_sharded: bool = True, cache: dict | None = None):
    """(name, whole shape, local shape, is expert) of every parameter `rank` holds.

    `experts_sharded=False` is the behaviour before routed experts were sharded: with ep > 1 every
    expert-data-parallel rank held whole copies of its experts. `cache` reuses the meta models of
    earlier calls (keyed by pipeline and EP rank)."""
    c = dims.coords(rank)
    cache = {} if cache is None else cache
    key = (dims.pp, c["pp"], dims.ep, c["ep"])
    if key not in cache:
        cache[key] = held_params(cfg, dims, c["pp"], c["ep"])
    out = []
    for name, held, whole, expert in cache[key]:
        shape = list(held)
        if dims.tp > 1 and (d := tp_shard_dim(name)) is not None:
            shape[d] = chunk_len(shape[d], dims.tp, c["tp"])
        if dims.dp_shard > 1:
            if expert and dims.ep > 1:
                if experts_sharded and dims.edp_shard > 1:
                    d = expert_shard_dim(name, len(shape))
                    shape[d] = chunk_len(shape[d], dims.edp_shard, c["edp_shard"])
            else:
                d = fsdp_shard_dim(name, len(shape))
                shape[d] = chunk_len(shape[d], dims.dp_shard, c["dp_shard"])
        out.append((name, whole, tuple(shape), expert))
    return out


def activation_estimate(cfg, dims: ParallelDims, micro_batch: int, seq_len: int, dtype_bytes: int = 2) -> dict:
    """Estimated bytes of activations saved for backward on the rank holding the first pipeline
    stage, per checkpointing mode ('none', 'selective', 'full').

    Counts the tensors the forward keeps for backward under autocast (`dtype_bytes` each; the
    residual stream, router and loss in fp32): per block, attention (norm in/out, q, k, v after
    rope, the attention output and its log-sum-exp), the FFN (norm in/out; dense: gate, up, their
    product; MoHGE: router logits and scores, dispatched tokens, per routed slot gate/up/product at
    the mean routed width, expert outputs, shared experts) and the head (logits and fp32
    log-softmax). Tensor/sequence parallel divide the dense parts by tp; the MoHGE layer runs on
    the gathered sequence. `full` keeps each block's input plus one block being recomputed;
    `selective` recomputes the attention sub-layer only. With pipeline parallel the first stage
    holds min(pp, micro-batches) micro-batches in flight (1F1B). An estimate: allocator caching,
    temporary buffers and communication buffers are not counted.
    """
    m, b = cfg.model, dtype_bytes
    T, D, tp = micro_batch * seq_len, m.d_model, dims.tp
    H, kv = m.n_heads, m.n_kv_heads * (D // m.n_heads)
    attn = (4 * T * D + b * T * D) / tp + b * T * (2 * D + 2 * kv) / tp + b * T * D / tp + 4 * T * H / tp
    residual = 4 * T * D / tp
    if m.ffn_type == "mohge":
        moe = m.moe
        widths = [g.ffn_hidden_size for g in moe.groups]
        f_mean = sum(g.ffn_hidden_size * g.num_experts for g in moe.groups) / moe.num_experts
        k = moe.top_k
        router = 4 * T * (4 * moe.num_experts + 3 * len(widths)) + 8 * T * k
        fold = tp if dims.moe_fold else 1  # folded: routed and shared experts see this tp rank's tokens
        experts = b * T * k * (2 * D + 3 * f_mean) / fold
        shared = (b * T * (3 * moe.shared_ffn_hidden_size * moe.num_shared_experts + D) / fold
                  if moe.num_shared_experts else 0)
        ffn = (4 * T * D + b * T * D) / tp + b * T * D + router + experts + shared
    else:
        ffn = (4 * T * D + b * T * D) / tp + 3 * b * T * m.ffn_hidden_size / tp
    block = attn + ffn
    stages = dims.pp * cfg.parallel.pp_virtual_stages
    from mohge.parallel.pipeline import layer_split

    layers = len(layer_split(m.n_layers, stages, cfg.parallel.pp_layer_split)[0]) if stages > 1 else m.n_layers
    head = (b + 8) * T * m.vocab_size / tp if stages == 1 else 0
    in_flight = min(dims.pp, max(1, cfg.train.global_batch_size // (cfg.train.micro_batch_size * dims.dp)))
    modes = {
        "none": layers * block + head,
        "selective": layers * (block - attn + residual) + attn + head,
        "full": layers * residual + block + head,
    }
    return {mode: int(v * in_flight) for mode, v in modes.items()}


def plan_memory(cfg, dims: ParallelDims, experts_sharded: bool = True, param_bytes: int = 4,
                ranks: list[int] | None = None, cache: dict | None = None) -> list[RankMemory]:
    """Counted per-rank state of every rank (or `ranks`): fp32 parameters, fp32 gradients, AdamW
    exp_avg + exp_avg_sq in the parameters' dtype and one fp32 step counter per tensor."""
    acts = activation_estimate(cfg, dims, cfg.train.micro_batch_size, cfg.train.seq_len)
    cache = {} if cache is None else cache
    out = []
    for rank in ranks if ranks is not None else range(dims.world_size):
        shapes = local_shapes(cfg, dims, rank, experts_sharded, cache)
        r = RankMemory(rank=rank, coords=dims.coords(rank))
        for _, _, local, expert in shapes:
            n = math.prod(local)
            r.param_elems += n
            r.expert_elems += n if expert else 0
        r.num_tensors = len(shapes)
        r.param_bytes = r.param_elems * param_bytes
        r.grad_bytes = r.param_elems * param_bytes
        r.optim_bytes = 2 * r.param_elems * param_bytes + 4 * r.num_tensors
        r.activation_bytes = acts["none"]
        r.activation_bytes_checkpointed = {k: v for k, v in acts.items() if k != "none"}
        out.append(r)
    return out


def whole_model_state_bytes(cfg, param_bytes: int = 4) -> int:
    """Parameter + gradient + AdamW bytes of the whole model on one process (the target's unit)."""
    (r,) = plan_memory(cfg, ParallelDims(1, 1, 1, 1, 1, 1), ranks=[0], param_bytes=param_bytes)
    return r.state_bytes


def summary(cfg, dims: ParallelDims, experts_sharded: bool = True) -> dict:
    """The planner's report for one layout: max-rank figures, the whole-model figure, every rank."""
    ranks = plan_memory(cfg, dims, experts_sharded)
    worst = max(ranks, key=lambda r: r.state_bytes + r.activation_bytes)
    whole = whole_model_state_bytes(cfg)
    return {
        "layout": {k: getattr(dims, k) for k in ("dp_replicate", "dp_shard", "tp", "pp", "ep", "world_size")}
        | {"edp_shard": dims.edp_shard, "experts_sharded": experts_sharded, "moe_fold": dims.moe_fold},
        "micro_batch_size": cfg.train.micro_batch_size,
        "seq_len": cfg.train.seq_len,
        "whole_model_state_bytes": whole,
        "max_rank": worst.as_dict(),
        "ratio_to_ideal": worst.state_bytes / (whole / dims.world_size),
        "ranks": [r.as_dict() for r in ranks],
    }
