"""lm-eval model `mohge`: scores a mohge checkpoint (or export) without a manual export step.

    mohge-lm-eval --model mohge --model_args checkpoint=runs/x,tokenizer=tokenizer.json --tasks ...

`mohge-lm-eval` is lm-eval's own command line with this model registered. A DCP checkpoint is
exported to a temporary transformers folder (`mohge-convert to-hf`, removed at exit) and scored
through lm-eval's `hf` model with trust_remote_code; an existing export is used as it is. Every
other `--model_args` entry (batch_size, dtype, device, ...) goes to lm-eval's HF model.
"""

from __future__ import annotations

import atexit
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

_REGISTERED = []


def export_dir(checkpoint: str, tokenizer: Optional[str] = None) -> str:
    """`checkpoint` itself when it is a to-hf export, else a fresh temporary export of it."""
    path = Path(checkpoint)
    config = path / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "mohge":
        return str(path)
    from mohge.launch.hf_export import to_hf

    out = tempfile.mkdtemp(prefix="mohge-lm-eval-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    to_hf(checkpoint, out, tokenizer=tokenizer)
    return out


def register():
    """Registers (once) and returns the lm-eval model class `mohge`."""
    if _REGISTERED:
        return _REGISTERED[0]
    import torch
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    @register_model("mohge")
    class MoHGELM(HFLM):
        def __init__(self, checkpoint: str, tokenizer: Optional[str] = None, **kwargs):
            kwargs.setdefault("dtype", "float32")
            kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
            super().__init__(pretrained=export_dir(checkpoint, tokenizer), trust_remote_code=True, **kwargs)

    _REGISTERED.append(MoHGELM)
    return MoHGELM


def main() -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("mohge-lm-eval: needs lm-eval: pip install 'mohge[hf]'", file=sys.stderr)
        return 2
    register()
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
