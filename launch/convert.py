"""`mohge-convert`: sharded DCP checkpoints <-> consolidated safetensors + config.json.

    mohge-convert to-safetensors --checkpoint RUN_OR_STEP_DIR --output DIR [--dtype bf16] [--max-shard-gb N]
    mohge-convert to-dcp --input DIR --output RUN_DIR
    mohge-convert to-hf | from-hf | import-hf ...   (transformers; launch/hf_export.py, launch/hf_import.py)

`to-safetensors` needs no process group and no model code: it reads the checkpoint's metadata,
loads every model tensor at full size, and joins per-expert entries back into [N, F, D] tensors.
`to-dcp` writes a weights-only sharded checkpoint (RUN_DIR/checkpoints/step_00000000) that any
layout can start from with `checkpoint.resume=RUN_DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from mohge.train.checkpoint import (FORMAT_VERSION, LATEST, META, CheckpointError, checkpoint_root, is_complete,
                                    quiet_single_process, read_meta, resolve_resume, split_entry, step_dir)
from mohge.train.errors import run_tool

EXPERT_KEY = re.compile(r"^(?P<name>.+)/expert/(?P<row>\d+)$")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _checkpoint_dir(path: str) -> Path:
    found = resolve_resume(path, path, flag="--checkpoint")
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint found")
    return found


def load_consolidated(path: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a DCP checkpoint at full size, experts joined per parameter. The
    checkpoint's checksums are verified first and unreadable shards are a CheckpointError naming
    the file, as when training resumes (docs/reliability.md)."""
    from mohge.train.checkpoint import DamagedCheckpoint, _last_line, verify_checkpoint

    meta_file = Path(path) / "meta.json"
    if meta_file.is_file():  # written by training (mohge-convert to-dcp writes none)
        verify_checkpoint(Path(path), read_meta(Path(path)))
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        state = {
            key: torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in metadata.items()
            if isinstance(meta, TensorStorageMetadata) and not key.startswith("optim/")
        }
        with quiet_single_process():
            dcp.load(state, checkpoint_id=str(path))
    except Exception as err:  # truncated or damaged shard (EOFError inside DCP's CheckpointException)
        raise DamagedCheckpoint(f"{path}: a shard cannot be read ({type(err).__name__}: {_last_line(err)}); the "
                                "checkpoint is damaged: use an earlier step") from err
    return join_experts(state)


def join_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    rows: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for key, tensor in state.items():
        match = EXPERT_KEY.match(key)
        if match:
            rows.setdefault(match["name"], {})[int(match["row"])] = tensor
        else:
            out[key] = tensor
    for name, by_row in rows.items():
        if sorted(by_row) != list(range(len(by_row))):
            raise CheckpointError(f"{name}: expert rows {sorted(by_row)} are not 0..N-1; the checkpoint is damaged")
        out[name] = torch.stack([by_row[r] for r in range(len(by_row))])
    return out


def split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of join_experts: one checkpoint entry per expert, as training saves them."""
    out = {}
    for name, tensor in state.items():
        out.update(split_entry(name, None, tensor.contiguous()))
    return out


def _say(message: str) -> None:
    """Progress on stderr (stdout keeps the final summary)."""
    print(f"mohge-convert: {message}", file=sys.stderr, flush=True)


def _readable(file: Path) -> None:
    """safetensors writes 0600; exports are shared, so 0644 (less what the umask removes)."""
    umask = os.umask(0)
    os.umask(umask)
    file.chmod(0o644 & ~umask)


def tokenizer_files(meta: dict, tokenizer: Optional[str] = None) -> list[Path]:
    """The tokenizer file(s) the checkpoint was trained with (or `tokenizer`); [] for synthetic/bytes."""
    data = meta.get("data_config") or {}
    if tokenizer is None:
        if data.get("source") == "embedded":
            from mohge.data.embedded import default_dir

            tokenizer = str(Path(data.get("embedded_dir") or default_dir()) / "tokenizer.json")
        elif data.get("source") == "megatron":
            tokenizer = data.get("tokenizer")
    if tokenizer in (None, "", "bytes"):
        return []
    if tokenizer == "embedded":
        from mohge.launch.tokenizer_arg import resolve_tokenizer

        return [Path(resolve_tokenizer(tokenizer))]
    path = Path(tokenizer)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: the tokenizer to copy into the export does not exist; pass --tokenizer PATH "
                              "(or --tokenizer bytes for none)")
    return [path]


def to_safetensors(checkpoint: str, output: str, dtype: Optional[str] = None, max_shard_gb: float = 0.0,
                   tokenizer: Optional[str] = None) -> list[Path]:
    path = _checkpoint_dir(checkpoint)
    meta = read_meta(path)
    tokenizers = tokenizer_files(meta, tokenizer)
    _say(f"reading {path} (step {meta['step']})")
    state = load_consolidated(path)
    _say(f"loaded {len(state)} tensors, {sum(t.numel() * t.element_size() for t in state.values()) / 1e6:.1f} MB")
    if dtype:
        state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"model": meta["model"], "step": meta["step"],
                                                 "format": "mohge", "format_version": FORMAT_VERSION}, indent=1))
    for file in tokenizers:
        shutil.copyfile(file, out / file.name)
        _say(f"copied tokenizer {file} -> {out / file.name}")
    return write_weights(state, out, max_shard_gb)


def write_weights(state: dict[str, torch.Tensor], out: Path, max_shard_gb: float, prefix: str = "") -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json above
    `max_shard_gb` (0: one file); files readable by the group, progress on stderr."""
    from safetensors.torch import save_file

    state = {prefix + k: v.contiguous() for k, v in state.items()}
    shards = _shard(state, max_shard_gb)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    files, index = [], {}
    for i, (shard, name) in enumerate(zip(shards, names)):
        file = out / name
        save_file(shard, str(file), metadata={"format": "pt"})
        _readable(file)
        _say(f"wrote {file}" if len(shards) == 1 else f"wrote {file.name} ({i + 1}/{len(shards)})")
        files.append(file)
        index.update({k: file.name for k in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    return files


def _shard(state: dict[str, torch.Tensor], max_shard_gb: float) -> list[dict[str, torch.Tensor]]:
    if max_shard_gb <= 0:
        return [state]
    limit, shards, size = max_shard_gb * 1e9, [{}], 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.contiguous()
        size += nbytes
    return shards


def read_safetensors(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, every tensor) from a consolidated directory, single file or sharded."""
    from safetensors.torch import load_file

    d = Path(directory)
    config_file = d / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing; a consolidated mohge checkpoint has config.json")
    config = json.loads(config_file.read_text())
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for name in files:
        if not (d / name).is_file():
            raise CheckpointError(f"{d / name}: missing weights file")
        state.update(load_file(str(d / name)))
    return config, state


def to_dcp(input_dir: str, output: str) -> Path:
    config, state = read_safetensors(input_dir)
    return write_dcp(config["model"], state, output)


def write_dcp(model: dict, state: dict[str, torch.Tensor], output: str) -> Path:
    """A weights-only step-0 checkpoint of `state` (experts joined) under run dir `output`."""
    target = step_dir(output, 0)
    target.mkdir(parents=True, exist_ok=True)
    with quiet_single_process():
        dcp.save(split_experts(state), checkpoint_id=str(target))
    meta = {"format_version": FORMAT_VERSION, "step": 0, "data": {"consumed_samples": 0},
            "model": model, "weights_only": True}
    (target / META).write_text(json.dumps(meta, indent=1))
    (checkpoint_root(output) / LATEST).write_text(target.name)
    assert is_complete(target)
    return target


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mohge-convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-safetensors", help="sharded checkpoint -> consolidated safetensors + config.json")
    a.add_argument("--checkpoint", required=True, help="a run dir (its latest checkpoint) or a step_* dir")
    a.add_argument("--output", required=True)
    a.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="e.g. bf16 for inference-only weights")
    a.add_argument("--max-shard-gb", type=float, default=0.0, help="split into shards + index (0: one file)")
    a.add_argument("--tokenizer", default=None, help="tokenizer to copy into the export: tokenizer.json (or "
                   "its directory), .model or 'embedded' (default: the one the run trained with; 'bytes': none)")
    b = sub.add_parser("to-dcp", help="consolidated safetensors -> weights-only sharded checkpoint")
    b.add_argument("--input", required=True)
    b.add_argument("--output", required=True, help="run dir; resume any layout with checkpoint.resume=DIR")
    from mohge.launch.hf_export import add_hf_commands

    add_hf_commands(sub)
    args = parser.parse_args(argv)
    return run_tool("convert", lambda: _main(args))


def check_shard_size(value: float) -> None:
    """--max-shard-gb: a size in GB, or 0 for one file."""
    from mohge.train.errors import UsageError

    if not (value >= 0 and value != float("inf")):  # also refuses nan
        raise UsageError(f"--max-shard-gb: must be a size in GB > 0, or 0 for one file (got {value})")


def _main(args: argparse.Namespace) -> int:
    from mohge.launch.hf_export import HF_COMMANDS, run_hf_command

    if getattr(args, "max_shard_gb", None) is not None:
        check_shard_size(args.max_shard_gb)
    if args.command in HF_COMMANDS:
        print(run_hf_command(args))
    elif args.command == "to-safetensors":
        files = to_safetensors(args.checkpoint, args.output, args.dtype, args.max_shard_gb, args.tokenizer)
        print(f"wrote {len(files)} file(s) and config.json to {args.output}")
    else:
        print(f"wrote {to_dcp(args.input, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
