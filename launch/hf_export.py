"""mohge checkpoints <-> transformers folders (`mohge-convert to-hf` / `from-hf`).

`to_hf` writes what `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads:
config.json (model_type "mohge", auto_map, the mohge model dict under "mohge"), model.safetensors
(sharded with an index above --max-shard-gb), the three model files (modeling.py,
configuration_mohge.py, modeling_mohge.py), generation_config.json and, given a tokenizer.json,
the tokenizer files. Weights keep their mohge names under "model.". Only what the standalone
module computes is exported: a config field or tensor it does not know is refused by name.
`from_hf` reads such a folder back into a weights-only DCP checkpoint that training resumes from.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from mohge.launch.convert import DTYPES, _checkpoint_dir, load_consolidated, write_dcp, write_weights
from mohge.model.config import ModelConfig
from mohge.train.checkpoint import CheckpointError, read_meta

HERE = Path(__file__).parent
MODEL_FILES = ("modeling.py", "configuration_mohge.py", "modeling_mohge.py")
# Fields the standalone module computes with, or that only matter to training. A field added
# later (another attention or routing variant) passes only at its dataclass default or a neutral
# value; anything else is refused until modeling.py learns it.
EXPORTED_MODEL = {"vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden_size", "max_seq_len",
                  "rope_theta", "norm_eps", "tie_embeddings", "init_std", "ffn_type", "first_k_dense", "moe",
                  "attention", "mla", "rope_scaling", "qk_norm"}
EXPORTED_MOE = {"groups", "k_group", "top_k", "topk_mode", "combine", "num_shared_experts", "shared_ffn_hidden_size",
                "group_aux_coeff", "group_aux_start_fraction", "group_aux_width_interval", "intra_aux_coeff",
                "z_loss_coeff", "router_init_std", "expert_compute", "allocation", "capacity_factor",
                "balance_scope", "bias_update_rate", "group_bias_update_rate"}
NEUTRAL = (None, False, 0, 0.0, "", "none", "mha", "gqa", "default")


def _unmapped(config: dict, known: set[str], defaults: dict) -> Optional[tuple[str, object]]:
    for key, value in config.items():
        if key not in known and value not in NEUTRAL and not (key in defaults and value == defaults[key]):
            return key, value
    return None


def check_exportable(model: dict, state: dict[str, torch.Tensor]) -> None:
    """Raises CheckpointError naming the first config field or tensor the HF export cannot map."""
    from mohge.launch.modeling import Decoder

    defaults = asdict(ModelConfig())
    for prefix, config, known, default in (("model.", model, EXPORTED_MODEL, defaults),
                                           ("model.moe.", model.get("moe") or {}, EXPORTED_MOE, defaults["moe"])):
        bad = _unmapped(config, known, default)
        if bad is not None:
            raise CheckpointError(f"{prefix}{bad[0]}={bad[1]!r}: the HF export does not map this field yet; "
                                  "teach launch/modeling.py first")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Decoder(model).state_dict().items()}
    for key, tensor in state.items():
        if key not in expected:
            raise CheckpointError(f"{key}: a tensor the HF model has no place for; it cannot be exported yet")
        if tuple(tensor.shape) != expected[key]:
            raise CheckpointError(f"{key}: shape {tuple(tensor.shape)} but the config implies {expected[key]}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{missing[0]}: missing from the checkpoint ({len(missing)} tensors missing)")


def _tokenizer_file(tokenizer: str) -> Path:
    if tokenizer == "embedded":  # the prepared demo tokenizer, or one line saying how to prepare it
        from mohge.launch.tokenizer_arg import resolve_tokenizer

        return Path(resolve_tokenizer(tokenizer))
    p = Path(tokenizer)
    p = p / "tokenizer.json" if p.is_dir() else p
    if not p.is_file() or p.suffix != ".json":
        raise CheckpointError(f"--tokenizer {tokenizer}: give a tokenizer.json (or its directory, or 'embedded'); "
                              "sentencepiece and byte tokenizers are not exported")
    return p


def to_hf(checkpoint: str, output: str, dtype: Optional[str] = None, max_shard_gb: float = 5.0,
          tokenizer: Optional[str] = None) -> Path:
    """Writes the transformers folder `output` from a run dir or step_* dir saved under any layout."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from mohge.data.tokenizers import EOD_TOKEN
    from mohge.launch.configuration_mohge import MoHGEConfig

    path = _checkpoint_dir(checkpoint)
    model = read_meta(path)["model"]
    tok_file = _tokenizer_file(tokenizer) if tokenizer else None
    state = load_consolidated(path)
    check_exportable(model, state)
    if dtype:
        state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    eos = None
    if tok_file is not None:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), eos_token=EOD_TOKEN, pad_token=EOD_TOKEN,
                                      model_max_length=model["max_seq_len"])
        if len(tok) > model["vocab_size"]:
            raise CheckpointError(f"--tokenizer {tok_file}: {len(tok)} tokens but model.vocab_size is "
                                  f"{model['vocab_size']}; give the tokenizer the run was trained with")
        tok.save_pretrained(str(out))
        eos = tok.eos_token_id
    config = MoHGEConfig(mohge=model, architectures=["MoHGEForCausalLM"], eos_token_id=eos, pad_token_id=eos,
                         auto_map={"AutoConfig": "configuration_mohge.MoHGEConfig",
                                   "AutoModelForCausalLM": "modeling_mohge.MoHGEForCausalLM"})
    config.dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config.save_pretrained(str(out))
    GenerationConfig(eos_token_id=eos, pad_token_id=eos).save_pretrained(str(out))
    for name in MODEL_FILES:
        shutil.copyfile(HERE / name, out / name)
    write_weights(state, out, max_shard_gb, prefix="model.")
    return out


def from_hf(input_dir: str, output: str) -> Path:
    """A transformers folder written by to_hf -> a weights-only checkpoint under run dir `output`."""
    from mohge.launch.modeling import read_config, read_state

    d = Path(input_dir)
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d / 'config.json'}: missing; give a folder written by mohge-convert to-hf")
    raw = json.loads((d / "config.json").read_text())
    if raw.get("model_type") != "mohge":
        raise CheckpointError(f"{d / 'config.json'}: model_type {raw.get('model_type')!r} is not a mohge export; "
                              "open Mixtral/Qwen-MoE/Llama checkpoints go through mohge-convert import-hf")
    model = read_config(d)
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_state(d).items()}
    check_exportable(model, state)
    return write_dcp(model, state, output)


HF_COMMANDS = ("to-hf", "from-hf", "import-hf")


def add_hf_commands(sub) -> None:
    """The transformers subcommands of mohge-convert."""
    a = sub.add_parser("to-hf", help="checkpoint -> transformers folder (trust_remote_code)")
    a.add_argument("--checkpoint", required=True, help="a run dir (its latest checkpoint) or a step_* dir")
    a.add_argument("--output", required=True)
    a.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="e.g. bf16 for inference-only weights")
    a.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size (0: one file)")
    a.add_argument("--tokenizer", default=None, help="tokenizer.json the run used (or 'embedded'): copied as HF files")
    b = sub.add_parser("from-hf", help="transformers folder from to-hf -> weights-only sharded checkpoint")
    b.add_argument("--input", required=True)
    b.add_argument("--output", required=True, help="run dir; resume any layout with checkpoint.resume=DIR")
    c = sub.add_parser("import-hf", help="open Mixtral/Qwen-MoE/Llama-style HF folder -> weights-only checkpoint")
    c.add_argument("--input", required=True, help="a transformers save_pretrained folder (safetensors)")
    c.add_argument("--output", required=True, help="run dir; writes its model config to DIR/model.yaml")
    c.add_argument("--upcycle-experts", type=int, default=0, help="dense models: N experts copied from each FFN")
    c.add_argument("--upcycle-top-k", type=int, default=2, help="experts per token of the upcycled model")
    c.add_argument("--seed", type=int, default=0, help="seed of the upcycled routers' initial weights")


def run_hf_command(args) -> str:
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise CheckpointError(f"{args.command} needs transformers: pip install 'mohge[hf]'") from err
    if args.command == "to-hf":
        out = to_hf(args.checkpoint, args.output, args.dtype, args.max_shard_gb, args.tokenizer)
        return f"wrote {out} (AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True))"
    if args.command == "import-hf":
        from mohge.launch.hf_import import import_hf
        from mohge.model.config import ConfigError

        try:
            target, model = import_hf(args.input, args.output, args.upcycle_experts, args.upcycle_top_k, args.seed)
        except ConfigError as err:
            raise CheckpointError(str(err)) from err
        return (f"wrote {target} ({model['ffn_type']}, {model['n_layers']} layers); resume it with the model "
                f"config in {args.output}/model.yaml and checkpoint.resume={args.output}")
    return f"wrote {from_hf(args.input, args.output)}"
