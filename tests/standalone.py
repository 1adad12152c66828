"""The standalone module (launch/modeling.py, loaded as a loose file) against a trainer model."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def assert_standalone_matches(model, cfg, folder: Path, seq_len: int) -> None:
    """Writes `model` under the export's names (one [N, F, D] tensor per size group, as
    mohge-convert writes them) into `folder`, loads it with launch/modeling.py and checks its
    logits equal the model's."""
    from mohge.launch.convert import join_experts
    from mohge.train.checkpoint import model_entries

    path = Path(__file__).parents[1] / "launch" / "modeling.py"
    spec = importlib.util.spec_from_file_location(f"standalone_modeling_{folder.name}", path)
    modeling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modeling)
    state = join_experts(model_entries(model))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model": dataclasses.asdict(cfg)}))
    standalone = modeling.MoHGEForCausalLM.from_pretrained(str(folder))
    tokens = torch.randint(0, 64, (2, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(standalone(tokens), model(tokens), rtol=1e-5, atol=1e-5)
