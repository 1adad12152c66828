"""Saved-for-backward bytes of one fp32 forward on CPU (saved_tensors_hooks) vs the planner's activation
estimate with dtype_bytes=4 (no activation checkpointing). Usage: python bench/activation_saved_bytes.py [overrides]"""
import sys

import torch
from mohge.train.hydra_config import compose_config
from mohge.model.transformer import build_model
from mohge.train.trainer import lm_loss
from mohge.parallel.dims import ParallelDims
from mohge.parallel.memory import activation_estimate
from mohge.parallel.activation_checkpoint import apply_activation_checkpointing

overrides = sys.argv[1:]
for mode in ("none",):
    cfg = compose_config("mohge_3b", ["model.n_layers=2", "model.vocab_size=8192", "train.micro_batch_size=1", "train.seq_len=512", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, "meta"); model.to_empty(device="cpu"); model.init_weights(0)
    apply_activation_checkpointing(model, mode)
    B, S = cfg.train.micro_batch_size, cfg.train.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (B, S))
    seen = {}
    def pack(t):
        s = t.untyped_storage()  # count each storage once (views share it)
        seen[s.data_ptr()] = s.nbytes()
        return t
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model(tokens), tokens)
    saved = sum(v for k, v in seen.items() if k not in params and k != model.rope.untyped_storage().data_ptr())
    est = activation_estimate(cfg, ParallelDims(1, 1, 1, 1, 1, 1), B, S, dtype_bytes=4)[mode]
    print(f"{mode:<10} saved {saved/2**20:9.1f} MiB  estimate {est/2**20:9.1f} MiB  ratio {est/saved:.2f}")
