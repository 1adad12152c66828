"""`mohge-plan --memory`: the planner's report (see parallel/memory.py) as a table or JSON, and with
--gpu-mem whether the layout fits and the smallest layouts that do."""

from __future__ import annotations

import json

from mohge.model.config import ConfigError
from mohge.parallel.config import ACTIVATION_CHECKPOINT, ParallelConfig
from mohge.parallel.dims import ParallelDims

GIB = 1 << 30


def _gib(n: float) -> str:
    return f"{n / GIB:.3f}"


def needed_bytes(rank: dict, mode: str) -> int:
    """State plus the activation estimate under checkpointing mode `mode`."""
    acts = rank["activation_bytes"] if mode == "none" else rank["activation_bytes_checkpointed"][mode]
    return rank["state_bytes"] + acts


def candidates(cfg, world: int):
    """Layouts of `world` processes: tp and pp powers of two that divide the heads and layers,
    dp_shard the rest, ep any divisor of dp_shard (and of the expert count) and, with tp > 1 in an
    MoE model, folded layouts (ep > 1 over tp x dp_shard ranks), each with every
    activation-checkpointing mode."""
    m = cfg.model
    num_experts = m.moe.num_experts if m.ffn_type == "mohge" else 1
    for tp in (1, 2, 4, 8):
        if world % tp or m.n_heads % tp or m.n_kv_heads % tp:
            continue
        for pp in (1, 2, 4, 8):
            if (world // tp) % pp or pp > m.n_layers:
                continue
            dp = world // (tp * pp)
            layouts = [(ep, False) for ep in range(1, dp + 1) if dp % ep == 0 and num_experts % ep == 0]
            if tp > 1 and num_experts > 1:
                layouts += [(ep, True) for ep in range(2, dp * tp + 1) if dp * tp % ep == 0 and num_experts % ep == 0]
            for ep, fold in layouts:
                for mode in ACTIVATION_CHECKPOINT:
                    yield ParallelConfig(dp_shard=dp, tp=tp, pp=pp, ep=ep, moe_fold=fold, activation_checkpoint=mode)


def propose(cfg, budget: int, max_world: int = 4096, top: int = 5) -> list[dict]:
    """The smallest world size with layouts that fit in `budget` bytes per rank, and up to `top`
    of them (least memory first). Each layout's worst rank among the first ranks of every
    pipeline stage is counted (ranks differ only by stage and by uneven last shards)."""
    import copy

    from mohge.parallel.memory import plan_memory

    cfg = copy.deepcopy(cfg)
    cfg.parallel.pp_virtual_stages, cfg.parallel.pp_layer_split = 1, None
    cache: dict = {}
    world = 1
    while world <= max_world:
        fits = []
        for pc in candidates(cfg, world):
            dims = ParallelDims(1, pc.dp_shard, pc.tp, pc.pp, pc.ep, world, pc.moe_fold)
            probe = [s * world // pc.pp for s in range(pc.pp)]
            try:
                ranks = plan_memory(cfg, dims, ranks=probe, cache=cache)
            except ConfigError:
                continue
            need = max(needed_bytes(r.as_dict(), pc.activation_checkpoint) for r in ranks)
            if need <= budget:
                fits.append({"world_size": world, "dp_shard": pc.dp_shard, "tp": pc.tp, "pp": pc.pp, "ep": pc.ep,
                             "moe_fold": pc.moe_fold, "activation_checkpoint": pc.activation_checkpoint,
                             "bytes_per_rank": need})
        if fits:
            return sorted(fits, key=lambda f: f["bytes_per_rank"])[:top]
        world *= 2
    return []


def memory_main(args) -> int:
    from mohge.parallel.memory import summary
    from mohge.train.hydra_config import compose_config

    try:
        if args.ep:
            raise ConfigError("--ep: with --memory give the layout as overrides (parallel.ep=8 parallel.dp_shard=64 ...)")
        cfg = compose_config(args.config_name, args.overrides)
        dims = ParallelDims.from_config(cfg.parallel, cfg.parallel.world_size)
        if args.experts_replicated and (dims.ep == 1 or dims.dp_shard == 1):
            raise ConfigError("--experts-replicated: changes nothing unless parallel.ep > 1 and parallel.dp_shard > 1")
        report = summary(cfg, dims, experts_sharded=not args.experts_replicated)
        mode = cfg.parallel.activation_checkpoint
        report["activation_checkpoint"] = mode
        report["needed_bytes"] = needed_bytes(report["max_rank"], mode)
        if args.gpu_mem is not None:
            budget = int(args.gpu_mem * GIB)
            report["gpu_mem_bytes"] = budget
            report["fits"] = report["needed_bytes"] <= budget
            report["proposals"] = propose(cfg, budget)
    except ConfigError as err:
        from mohge.train.errors import report

        return report("plan", err)
    if args.json:
        print(json.dumps({"config": args.config_name, "memory": report}, indent=1))
        return 0
    _print(args.config_name, report)
    return 0


def _print(name: str, report: dict) -> None:
    lay, worst = report["layout"], report["max_rank"]
    experts = "sharded over edp_shard" if lay["experts_sharded"] else "whole copies on every edp rank"
    print(f"{name}: dp_replicate {lay['dp_replicate']} x dp_shard {lay['dp_shard']} x tp {lay['tp']} x pp {lay['pp']}"
          f" ({lay['world_size']} ranks), ep {lay['ep']}{' folded over tp x dp' if lay.get('moe_fold') else ''}, "
          f"edp_shard {lay['edp_shard']}; routed experts {experts}")
    print(f"micro-batch {report['micro_batch_size']} x seq {report['seq_len']}; fp32 params/grads, AdamW fp32 states")
    print(f"{'GiB per rank (max rank ' + str(worst['rank']) + ')':<34} {'params':>8} {'grads':>8} {'optim':>8} "
          f"{'state':>8} {'x ideal':>8}")
    print(f"{'':<34} {_gib(worst['param_bytes']):>8} {_gib(worst['grad_bytes']):>8} {_gib(worst['optim_bytes']):>8} "
          f"{_gib(worst['state_bytes']):>8} {report['ratio_to_ideal']:>8.3f}")
    print(f"whole model state {_gib(report['whole_model_state_bytes'])} GiB; ideal per rank (whole / "
          f"{lay['world_size']}) {_gib(report['whole_model_state_bytes'] / lay['world_size'])} GiB")
    acts = {"none": worst["activation_bytes"], **worst["activation_bytes_checkpointed"]}
    print("activation estimate (GiB): " + ", ".join(f"{k} {_gib(v)}" for k, v in acts.items())
          + f"; configured: {report['activation_checkpoint']}, total {_gib(report['needed_bytes'])} GiB")
    if "fits" in report:
        print(f"--gpu-mem {_gib(report['gpu_mem_bytes'])} GiB: {'fits' if report['fits'] else 'does NOT fit'}")
        if report["proposals"]:
            print("smallest layouts that fit (state + activations, worst rank):")
            for p in report["proposals"]:
                print(f"  {p['world_size']:>5} ranks: parallel.dp_shard={p['dp_shard']} parallel.tp={p['tp']} "
                      f"parallel.pp={p['pp']} parallel.ep={p['ep']}{' parallel.moe_fold=true' if p['moe_fold'] else ''} "
                      f"parallel.activation_checkpoint="
                      f"{p['activation_checkpoint']}  ({_gib(p['bytes_per_rank'])} GiB)")
        else:
            print("no layout up to 4096 ranks fits")
