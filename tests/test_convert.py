"""Conversion round trip and the standalone inference module."""

from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path

import pytest
import torch

from mohge.launch.convert import load_consolidated, main as convert_main, read_safetensors
from mohge.train.checkpoint import find_latest
from mohge.train.hydra_config import compose_config
from mohge.train.trainer import Trainer, train

COMMON = ["data=synthetic", "logging.progress=false", "train.eval_every=0", "train.steps=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(compose_config("tiny_mohge", [*COMMON, f"out_dir={out}"]))
    return out


def test_round_trip_preserves_every_tensor(run_dir, tmp_path):
    original = load_consolidated(find_latest(str(run_dir)))
    assert convert_main(["to-safetensors", "--checkpoint", str(run_dir), "--output", str(tmp_path / "st"),
                         "--max-shard-gb", "0.0001"]) == 0
    assert (tmp_path / "st" / "model.safetensors.index.json").is_file()
    _, exported = read_safetensors(str(tmp_path / "st"))
    assert exported.keys() == original.keys()
    assert convert_main(["to-dcp", "--input", str(tmp_path / "st"), "--output", str(tmp_path / "back")]) == 0
    back = load_consolidated(find_latest(str(tmp_path / "back")))
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key
        assert torch.equal(exported[key], tensor), key
    experts = [k for k in original if k.endswith("experts.groups.1.w1")]
    assert experts and original[experts[0]].shape == (4, 32, 32)


def test_converted_checkpoint_starts_a_run_in_any_layout(run_dir, tmp_path):
    convert_main(["to-safetensors", "--checkpoint", str(run_dir), "--output", str(tmp_path / "st")])
    convert_main(["to-dcp", "--input", str(tmp_path / "st"), "--output", str(tmp_path / "run")])
    trainer = Trainer(compose_config("tiny_mohge", [*COMMON, f"out_dir={tmp_path / 'run'}", "checkpoint.resume=auto"]))
    assert trainer.step == 0  # weights only: fresh optimizer and schedule
    weights = load_consolidated(find_latest(str(run_dir)))
    for name, p in trainer.model.named_parameters():
        if ".experts." not in name:
            assert torch.equal(p, weights[name]), name


def test_standalone_modeling_matches_training_logits(run_dir, tmp_path):
    convert_main(["to-safetensors", "--checkpoint", str(run_dir), "--output", str(tmp_path / "st")])
    path = Path(__file__).parents[1] / "launch" / "modeling.py"
    spec = importlib.util.spec_from_file_location("standalone_modeling", path)
    modeling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modeling)  # loaded as a loose file: it must not need mohge
    standalone = modeling.MoHGEForCausalLM.from_pretrained(str(tmp_path / "st"))

    trainer = Trainer(compose_config("tiny_mohge", [*COMMON, f"out_dir={run_dir}", "checkpoint.resume=auto"]))
    trainer.model.eval()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trainer.model(tokens)
    torch.testing.assert_close(standalone(tokens), expected, rtol=1e-5, atol=1e-5)
    imports = [l for l in path.read_text().splitlines() if l.startswith(("import ", "from "))]
    assert not [l for l in imports if "mohge" in l]
    assert standalone.generate(tokens[:, :4], 3).shape == (2, 7)


def test_convert_errors_name_the_path(tmp_path, capsys):
    assert convert_main(["to-safetensors", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint={tmp_path / 'nope'}: " in err and "does not exist" in err and "checkpoint.resume" not in err
    (tmp_path / "empty").mkdir()
    assert convert_main(["to-safetensors", "--checkpoint", str(tmp_path / "empty"), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint" in err and "checkpoint.resume" not in err, err
    assert convert_main(["to-dcp", "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_load_for_eval_matches_the_trained_model(run_dir, tmp_path):
    """The public loader gives the training model's logits from a run dir and from an export."""
    from mohge.launch.load import load_for_eval

    trainer = Trainer(compose_config("tiny_mohge", [*COMMON, f"out_dir={run_dir}", "checkpoint.resume=auto"]))
    trainer.model.eval()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trainer.model(tokens)
    convert_main(["to-safetensors", "--checkpoint", str(run_dir), "--output", str(tmp_path / "st")])
    for source in (str(run_dir), str(tmp_path / "st")):
        model, cfg = load_for_eval(source)
        assert not model.training and cfg.vocab_size == 256
        with torch.no_grad():
            torch.testing.assert_close(model(tokens), expected, rtol=0, atol=0)


def test_export_is_group_readable_reports_progress_and_copies_the_tokenizer(run_dir, tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    old = os.umask(0o022)
    try:
        assert convert_main(["to-safetensors", "--checkpoint", str(run_dir), "--output", str(tmp_path / "st"),
                             "--tokenizer", str(tmp_path / "tok")]) == 0
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    assert "mohge-convert: reading " in err and "mohge-convert: wrote " in err and "copied tokenizer" in err
    assert stat.S_IMODE((tmp_path / "st" / "model.safetensors").stat().st_mode) == 0o644
    assert (tmp_path / "st" / "tokenizer.json").read_text() == "{}"
    assert convert_main(["to-safetensors", "--checkpoint", str(run_dir), "--output", str(tmp_path / "x"),
                         "--tokenizer", str(tmp_path / "missing")]) == 2
    assert "the tokenizer to copy into the export does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["to-safetensors", "to-hf"])
@pytest.mark.parametrize("size", ["-1", "-0.5", "nan", "inf"])
def test_bad_shard_size_is_refused_before_any_work(run_dir, tmp_path, command, size, capsys):
    assert convert_main([command, "--checkpoint", str(run_dir), "--output", str(tmp_path / "o"),
                         "--max-shard-gb", size]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [err.strip()], err
    assert err.startswith("mohge-convert: usage error: --max-shard-gb: must be a size in GB > 0, or 0 for one file")
    assert not (tmp_path / "o").exists()


def test_to_safetensors_accepts_the_embedded_tokenizer_spelling(run_dir, tmp_path, monkeypatch, capsys):
    import mohge.data.embedded as embedded

    monkeypatch.setattr(embedded, "default_dir", lambda: tmp_path / "embedded")
    args = ["to-safetensors", "--checkpoint", str(run_dir), "--output", str(tmp_path / "st"), "--tokenizer", "embedded"]
    assert convert_main(args) == 2  # not prepared: one line saying how
    assert "--tokenizer embedded" in capsys.readouterr().err
    (tmp_path / "embedded").mkdir()
    (tmp_path / "embedded" / "tokenizer.json").write_text("{}")
    assert convert_main(args) == 0
    assert (tmp_path / "st" / "tokenizer.json").read_text() == "{}"
