"""train.compile: blocks compile with fullgraph=True (no graph breaks) and train like eager."""

from __future__ import annotations

import pytest
import torch
from conftest import init_module, make_moe

from mohge.model.config import ConfigError
from mohge.model.moe.layer import MoHGELayer
from mohge.train.hydra_config import compose_config
from mohge.train.trainer import Trainer

COMMON = ["data=synthetic", "logging.progress=false", "train.eval_every=0", "train.log_every=1",
          "train.steps=3", "checkpoint.save_final=false"]


@pytest.mark.parametrize("compute", ["grouped", "ragged"])
@pytest.mark.parametrize("mode, top_k, capacity", [("global", 3, None), ("per_group", 4, 0.75)])
def test_moe_layer_compiles_with_fullgraph(mode, top_k, capacity, compute):
    """fullgraph=True turns any graph break (host sync, data-dependent shape) into an error.
    aot_eager traces forward and backward like inductor does, without generating code."""
    moe = make_moe(topk_mode=mode, top_k=top_k, capacity_factor=capacity)
    layer = init_module(MoHGELayer(16, moe, compute), seed=1)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    eager = layer(x)
    eager.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b)
    for _ in range(10):  # more forwards than the recompile limit (8): no guard changes per forward
        compiled(x)
    assert layer.stats.pop()["forwards"] == 12  # routing statistics still recorded when compiled


def test_compiled_block_under_full_activation_checkpointing_matches_eager():
    """parallel.activation_checkpoint=full with train.compile: the checkpoint stays eager around
    the compiled forward, whose recompute replays the graph the forward ran (same saved tensors:
    the routing statistics it first saw) and records nothing twice. Two forwards, as two
    micro-batches (the second sees recorded statistics)."""
    from torch import nn

    from mohge.parallel.activation_checkpoint import apply_activation_checkpointing
    from mohge.parallel.compile import apply_compile

    def run(checkpointed):
        model = nn.Module()
        model.layers = nn.ModuleDict({"0": init_module(MoHGELayer(16, make_moe(), "ragged"), seed=1)})
        if checkpointed:
            apply_activation_checkpointing(model, "full")
            apply_compile(model, backend="aot_eager")
        outs = []
        # Without early stop the recompute runs to the end of the forward, where it would record.
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            for seed in (2, 3):
                x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(seed))
                out = model.layers["0"](x)
                out.square().sum().backward()
                outs.append(out.detach())
        layer = model.layers["0"]
        return outs, [p.grad for p in layer.parameters()], layer.stats.pop(), layer.balance.pop(x.device)

    (outs, grads, stats, counts), (ref_outs, ref_grads, ref_stats, ref_counts) = run(True), run(False)
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        torch.testing.assert_close(a, b)
    assert stats["forwards"] == ref_stats["forwards"] == 2
    torch.testing.assert_close(stats["tokens_per_expert"], ref_stats["tokens_per_expert"])
    torch.testing.assert_close(counts, ref_counts)
    for name in ("group_aux_loss", "intra_group_aux_loss", "z_loss"):
        assert stats[name] == pytest.approx(ref_stats[name])


def _selective_grads(compiled: bool):
    """Loss and gradients of a 1-layer tiny_mohge, eager or with the attention checkpointed
    (selective) and the blocks compiled with the eager backend."""
    import torch.nn.functional as F

    from mohge.model.transformer import build_model
    from mohge.parallel.activation_checkpoint import apply_activation_checkpointing
    from mohge.parallel.compile import apply_compile

    cfg = compose_config("tiny_mohge", ["model.n_layers=1"]).model
    model = build_model(cfg, "meta", "ragged")
    if compiled:
        apply_activation_checkpointing(model, "selective")
        apply_compile(model, "eager")
    model.to_empty(device="cpu")
    model.init_weights(7)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_compiled_block_under_selective_activation_checkpointing_matches_eager():
    """parallel.activation_checkpoint=selective + train.compile_backend=eager (the config allows
    it): the attention's checkpoint sits inside the compiled block, which dynamo traces only
    without a context_fn (it failed with 'checkpoint not implemented for ... context_fn')."""
    (loss, grads), (ref_loss, ref_grads) = _selective_grads(True), _selective_grads(False)
    torch.testing.assert_close(loss, ref_loss)
    assert sorted(grads) == sorted(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, msg=lambda m: f"{name}: {m}")


def test_compile_rejects_the_loop_experts():
    with pytest.raises(ConfigError, match="model.moe.expert_compute=loop"):
        compose_config("tiny_mohge", ["train.compile=true", "model.moe.expert_compute=loop"])


def test_start_line_says_the_blocks_compile(tmp_path, capsys):
    """The first step's time includes compilation: the start-up line says so."""
    Trainer(compose_config("tiny_mohge", [*COMMON, f"out_dir={tmp_path / 'c'}", "train.compile=true"]))
    assert "blocks compiled (inductor; the first step compiles them)" in capsys.readouterr().out
    Trainer(compose_config("tiny_mohge", [*COMMON, f"out_dir={tmp_path / 'e'}"]))
    assert "compiled" not in capsys.readouterr().out


def _tp_grads(rank, world, compile_blocks: bool):
    """Loss and full-size gradients of tiny_mohge (qk-norm: a gradient all-reduce inside each
    block) after one forward/backward under tp=world with sequence parallel, blocks compiled
    (aot_eager: dynamo + AOTAutograd through DTensor) or eager."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh

    from mohge.model.transformer import build_model
    from mohge.parallel.compile import apply_compile
    from mohge.parallel.tensor_parallel import apply_tensor_parallel, loss_context

    cfg = compose_config("tiny_mohge", ["model.qk_norm=true", "model.n_kv_heads=2", f"parallel.tp={world}",
                                        "parallel.dp_shard=1"]).model
    model = build_model(cfg, "meta", "ragged")
    apply_tensor_parallel(model, init_device_mesh("cpu", (world,)), sequence_parallel=True)
    if compile_blocks:
        apply_compile(model, "aot_eager", tensor_parallel=True)
    model.to_empty(device="cpu")
    model.init_weights(7)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    with loss_context(True):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        # validation's forward (no_grad): the first block gets a plain tensor, as in training
        first_input = []
        model.layers["0"].register_forward_pre_hook(lambda m, args: first_input.append(type(args[0])))
        with torch.no_grad():
            val = F.cross_entropy(model(tokens[:, 1:]).flatten(0, 1), tokens[:, :-1].flatten())
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    grads = {n: full(p.grad).clone() for n, p in model.named_parameters()}
    return float(full(loss.detach())), float(full(val)), first_input, grads


def _tp_rank(rank, world):
    return _tp_grads(rank, world, compile_blocks=False), _tp_grads(rank, world, compile_blocks=True)


@pytest.mark.multirank
def test_compiled_blocks_under_tensor_parallel_match_eager():
    """tp=2 + sequence parallel: compiled blocks give eager's loss and every gradient. The first
    block's input is the embedding's DTensor.to_local() view; AOTAutograd used to hand its
    gradient to the DTensor redistribute behind it as a plain tensor (AttributeError in backward)
    until parallel/compile.py copied it out of the view. A no_grad forward (validation) matches too."""
    from distributed import run_ranks

    for (want_loss, want_val, _, want), (got_loss, got_val, first_input, got) in run_ranks(2, _tp_rank, timeout=300):
        assert got_loss == pytest.approx(want_loss, rel=1e-6)
        assert got_val == pytest.approx(want_val, rel=1e-6)
        assert first_input == [torch.Tensor]  # no recompile for an AsyncCollectiveTensor in validation
        assert sorted(got) == sorted(want)
        for name, g in want.items():
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def _losses(tmp_path, name, *overrides):
    trainer = Trainer(compose_config("tiny_mohge", [*COMMON, f"out_dir={tmp_path / name}", *overrides]))
    return [trainer.train_step()[0] for _ in range(3)]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_compiled_training_with_activation_checkpointing_matches_eager(tmp_path):
    """mohge-train, 3 steps of 2 micro-batches: compiled blocks (aot_eager) under full activation
    checkpointing against eager without it: the same losses and the same logged routing metrics
    (a recompute recording twice would change the group fractions and aux losses)."""
    import json

    runs = {}
    for name, overrides in {"eager": [], "compiled": ["train.compile=true", "train.compile_backend=aot_eager",
                                                      "parallel.activation_checkpoint=full"]}.items():
        _cli_losses(tmp_path / name, 1, "model.moe.expert_compute=ragged", *overrides)
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [line for line in lines if "loss" in line]
    assert len(runs["eager"]) == len(runs["compiled"]) == 3

    def numbers(line, prefix=""):  # every logged number but the speed ones, incl. the per-layer "moe" dict
        for key, value in line.items():
            if isinstance(value, dict):
                yield from numbers(value, f"{prefix}{key}.")
            elif key not in ("tokens_per_s", "tflops", "mfu"):
                for i, v in enumerate(value if isinstance(value, list) else [value]):
                    yield f"{prefix}{key}[{i}]", float(v)

    for eager, compiled in zip(runs["eager"], runs["compiled"]):
        expected, got = dict(numbers(eager)), dict(numbers(compiled))
        assert got.keys() == expected.keys() and "moe.layers.0.ffn.group_fraction[0]" in got
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.timeout(1800)  # inductor compiles C++ on the CPU: minutes on a loaded machine
def test_compiled_training_matches_eager(tmp_path):
    """Three steps of tiny_mohge, inductor-compiled blocks (auto: the ragged experts on the CPU) vs
    eager with the grouped experts: compile and the two exact paths agree."""
    eager = _losses(tmp_path, "eager", "model.moe.expert_compute=grouped")
    compiled = _losses(tmp_path, "compiled", "train.compile=true")
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


def _cli_losses(out_dir, nproc: int, *overrides) -> list[float]:
    """Losses of 3 steps of mohge-train (torchrun on gloo for nproc > 1)."""
    from distributed import run_train

    base = ["--config-name", "tiny_mohge", *COMMON, "train.micro_batch_size=2", "train.global_batch_size=4",
            "model.moe.expert_compute=grouped"]
    return [line["loss"] for line in run_train(out_dir, nproc, base, *overrides, timeout=1500) if "loss" in line]


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.timeout(3000)
@pytest.mark.parametrize("layout", [["parallel.dp_shard=2"], ["parallel.dp_shard=2", "parallel.ep=2"],
                                    ["parallel.dp_shard=2", "model.moe.expert_compute=ragged"],
                                    ["parallel.pp=2", "parallel.dp_shard=1"],
                                    ["parallel.tp=2", "parallel.dp_shard=1", "model.moe.expert_compute=ragged"],
                                    ["parallel.dp_shard=2", "parallel.cp=2"]],
                         ids=["fsdp2", "ep2", "fsdp2-ragged", "pp2", "tp2-ragged", "cp2-ring"])
def test_compiled_layouts_match_eager_single_process(tmp_path, layout):
    """Compiled blocks (aot_eager: dynamo + AOTAutograd through FSDP2 / DTensor / TP + sequence
    parallel / the EP all-to-all / the ring attention's graph break; inductor's numerics are checked single-process above) give the eager
    single-process losses."""
    eager = _cli_losses(tmp_path / "eager", 1)
    compiled = _cli_losses(tmp_path / "compiled", 2, "train.compile=true", "train.compile_backend=aot_eager", *layout)
    assert len(compiled) == len(eager) == 3
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
