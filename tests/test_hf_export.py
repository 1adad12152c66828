"""mohge-convert to-hf / from-hf: the transformers export loads, matches the trainer and generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF export needs `pip install 'mohge[hf]'`")
from distributed import free_port  # noqa: E402

from mohge.launch.convert import load_consolidated, main as convert_main  # noqa: E402
from mohge.launch.hf_export import check_exportable  # noqa: E402
from mohge.train.checkpoint import CheckpointError, find_latest  # noqa: E402
from mohge.train.hydra_config import compose_config  # noqa: E402
from mohge.train.trainer import Trainer, train  # noqa: E402

ROOT = Path(__file__).parents[1]
COMMON = ["data=synthetic", "logging.progress=false", "train.eval_every=0", "train.steps=2"]
PROMPTS = [[5, 17, 99, 3, 250, 8, 41], [200, 1, 64], [7, 7, 7, 7, 12]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-step single-process run per preset."""
    out = {}
    for preset in ("tiny_mohge", "tiny_moe"):
        out[preset] = tmp_path_factory.mktemp(preset)
        train(compose_config(preset, [*COMMON, f"out_dir={out[preset]}"]))
    return out


def _trainer_logits(preset: str, checkpoint, tokens) -> torch.Tensor:
    """The training model's logits after resuming `checkpoint` in one process."""
    trainer = Trainer(compose_config(preset, [*COMMON, f"out_dir={checkpoint}", "checkpoint.resume=auto"]))
    trainer.model.eval()
    with torch.no_grad():
        return trainer.model(tokens)


def _load(out, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=dtype).eval()


def _export(run_dir, out, *extra) -> None:
    assert convert_main(["to-hf", "--checkpoint", str(run_dir), "--output", str(out), *extra]) == 0


@pytest.mark.parametrize("preset", ["tiny_mohge", "tiny_moe"])
def test_export_loads_in_transformers_with_the_trainers_logits(runs, preset, tmp_path):
    _export(runs[preset], tmp_path / "hf", "--max-shard-gb", "0.0001")
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "generation_config.json", "modeling.py", "modeling_mohge.py", "configuration_mohge.py",
            "model.safetensors.index.json"} <= files
    assert sum(name.endswith(".safetensors") for name in files) > 1  # sharded
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    model = _load(tmp_path / "hf")
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(tokens).logits
    torch.testing.assert_close(got, _trainer_logits(preset, runs[preset], tokens), rtol=1e-5, atol=1e-5)
    labels = tokens.clone()
    loss = model(tokens, labels=labels).loss
    expected = torch.nn.functional.cross_entropy(got[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    torch.testing.assert_close(loss, expected)


def test_hf_generate_with_cache_is_token_identical(runs, tmp_path):
    """HF generate with its cache == without == each prompt alone; the cache serves one token per step."""
    _export(runs["tiny_mohge"], tmp_path / "hf")
    model = _load(tmp_path / "hf", torch.float64)
    width = max(map(len, PROMPTS))
    tokens = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    seen = []
    forward = model.model.forward
    model.model.forward = lambda t, *a, **k: (seen.append(t.shape[1]), forward(t, *a, **k))[1]
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(tokens, use_cache=True, **kw)
    assert seen == [width] + [1] * 7
    assert torch.equal(cached, model.generate(tokens, use_cache=False, **kw))
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, use_cache=False)
        assert cached[row, width:].tolist() == alone[0, len(prompt):].tolist(), row
    sample = {**kw, "do_sample": True, "temperature": 0.9, "top_p": 0.9, "top_k": 0}
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        runs.append(model.generate(tokens, use_cache=use_cache, **sample))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], cached)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.dp_shard=2", "parallel.ep=2"], ["parallel.tp=2"]],
                         ids=["fsdp2-ep2", "tp2"])
def test_export_of_a_multi_process_checkpoint_matches_the_trainer(tmp_path, layout):
    """A checkpoint saved by 2 processes (FSDP + expert parallel, or tensor parallel) exports to the
    same logits as the trainer resuming it in one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOHGE_CPU": "1", "NPROC_PER_NODE": "2",
           "MASTER_PORT": str(free_port()), "PYTHON": sys.executable}
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), "--config-name", "tiny_mohge", *COMMON,
           "train.micro_batch_size=2", "train.global_batch_size=4", *layout, f"out_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _export(tmp_path / "run", tmp_path / "hf")
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = _load(tmp_path / "hf")(tokens).logits
    torch.testing.assert_close(got, _trainer_logits("tiny_mohge", tmp_path / "run", tokens), rtol=1e-5, atol=1e-5)


def test_from_hf_gives_a_checkpoint_training_resumes_from(runs, tmp_path):
    _export(runs["tiny_moe"], tmp_path / "hf", "--dtype", "fp32")
    assert convert_main(["from-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "run")]) == 0
    weights = load_consolidated(find_latest(str(runs["tiny_moe"])))
    back = load_consolidated(find_latest(str(tmp_path / "run")))
    assert back.keys() == weights.keys()
    for key, tensor in weights.items():
        assert torch.equal(back[key], tensor), key
    cfg = compose_config("tiny_moe", [*COMMON, "train.steps=3", f"out_dir={tmp_path / 'run'}", "checkpoint.resume=auto"])
    trainer = Trainer(cfg)
    assert trainer.step == 0
    for name, p in trainer.model.named_parameters():
        if ".experts." not in name:
            assert torch.equal(p, weights[name]), name
    train(cfg)  # and it trains on from there
    assert find_latest(str(tmp_path / "run")).name == "step_00000003"


def test_export_refuses_what_it_cannot_map(runs, tmp_path, capsys):
    weights = load_consolidated(find_latest(str(runs["tiny_moe"])))
    model = json.loads((find_latest(str(runs["tiny_moe"])) / "meta.json").read_text())["model"]
    with pytest.raises(CheckpointError, match="model.attention_type='mla'"):
        check_exportable({**model, "attention_type": "mla"}, weights)
    check_exportable({**model, "attention_type": "gqa"}, weights)  # a neutral value of a later field passes
    with pytest.raises(CheckpointError, match="layers.0.attention.kv_norm.weight"):
        check_exportable(model, {**weights, "layers.0.attention.kv_norm.weight": torch.ones(4)})
    with pytest.raises(CheckpointError, match="model.moe.router='flat'"):  # HMoE routing: not in modeling.py
        check_exportable({**model, "moe": {**model["moe"], "router": "flat"}}, weights)
    with pytest.raises(CheckpointError, match="layers.0.ffn.router.expert_bias"):  # a bias the config does not imply
        check_exportable(model, {**weights, "layers.0.ffn.router.expert_bias": torch.zeros(8)})
    _export(runs["tiny_moe"], tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["mohge"]["moe"]["router_bias"] = "aux_free"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert convert_main(["from-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "o")]) == 2
    assert "model.moe.router_bias='aux_free'" in capsys.readouterr().err
    assert convert_main(["to-hf", "--checkpoint", str(runs["tiny_moe"]), "--output", str(tmp_path / "x"),
                         "--tokenizer", str(tmp_path / "none.json")]) == 2
    assert "--tokenizer" in capsys.readouterr().err


# the authors' attention on tiny_mohge: MLA (q compression, qk-norm) + YaRN, and aux-loss-free
# selection biases large enough to change some expert choices
MLA_BIAS = ["model.attention=mla", "model.n_kv_heads=4", "model.mla.kv_lora_rank=16", "model.mla.qk_nope_head_dim=8",
            "model.mla.qk_rope_head_dim=4", "model.mla.v_head_dim=8", "model.mla.q_lora_rank=12",
            "model.rope_scaling.type=yarn", "model.rope_scaling.factor=4", "model.rope_scaling.original_max_seq_len=16",
            "model.rope_scaling.mscale_all_dim=1.0", "model.moe.bias_update_rate=0.05",
            "model.moe.group_bias_update_rate=0.05"]
QK_NORM = ["model.qk_norm=true", "model.n_kv_heads=2"]


@pytest.mark.parametrize("extra", [MLA_BIAS, QK_NORM], ids=["mla-yarn-router-bias", "gqa-qk-norm"])
def test_export_of_new_attention_matches_the_trainer_and_round_trips(tmp_path, extra):
    """to-hf of an MLA + YaRN model with aux-free router biases (and of GQA with qk-norm): the
    transformers model gives the trainer's logits, generates the same tokens with and without its
    cache, and from-hf gives back every tensor."""
    run = tmp_path / "run"
    train(compose_config("tiny_mohge", [*COMMON, *extra, f"out_dir={run}"]))
    weights = load_consolidated(find_latest(str(run)))
    if extra is MLA_BIAS:
        assert any(k.endswith("router.expert_bias") and v.abs().max() > 0 for k, v in weights.items())
    _export(run, tmp_path / "hf")
    model = _load(tmp_path / "hf")
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    trainer = Trainer(compose_config("tiny_mohge", [*COMMON, *extra, f"out_dir={run}", "checkpoint.resume=auto"]))
    trainer.model.eval()
    with torch.no_grad():
        got, want = model(tokens).logits, trainer.model(tokens)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if extra is MLA_BIAS:  # the biases change expert choices, so ignoring them would show
            for name, buf in model.named_buffers():
                if name.endswith("_bias"):
                    buf.zero_()
            assert not torch.allclose(model(tokens).logits, want, rtol=1e-5, atol=1e-5)
    model = _load(tmp_path / "hf", torch.float64)
    prompt = torch.tensor([PROMPTS[0]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, use_cache=True, **kw), model.generate(prompt, use_cache=False, **kw))
    assert convert_main(["from-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "back")]) == 0
    back = load_consolidated(find_latest(str(tmp_path / "back")))
    assert back.keys() == weights.keys()
    for key, tensor in weights.items():
        assert torch.equal(back[key], tensor), key
