"""`mohge-eval`: perplexity of a checkpoint on held-out text.

    mohge-eval --checkpoint RUN_OR_STEP_OR_EXPORT_DIR --data FILE_OR_PREFIX... [--tokenizer PATH]
               [--seq-len N] [--batch-size B] [--max-tokens N] [--json OUT]

The model: a DCP run/step directory (any layout; read without a process group), or a folder of
`mohge-convert to-safetensors` / `to-hf`, run through the standalone module (launch/modeling.py,
the trainer's logits to 1e-5; dropless even if trained with a capacity factor). The data: jsonl
(`text` field), .txt or .parquet documents, tokenized with any tokenizer the trainer supports and
ended with its end-of-document id, or Megatron PREFIX.bin/.idx as mohge-preprocess writes them.
Documents are joined into one token stream and cut into windows of seq_len predicted tokens
(each window also sees the last token of the one before), so every token after the first is
scored exactly once. Loss is the mean next-token cross-entropy (nats); perplexity = exp(loss).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from mohge.data.errors import DataError
from mohge.train.checkpoint import CheckpointError
from mohge.train.errors import run_tool


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The standalone model of a DCP checkpoint or an exported folder, in eval mode."""
    from mohge.launch.modeling import MoHGEForCausalLM

    p = Path(path)
    if (p / "config.json").is_file():
        return MoHGEForCausalLM.from_pretrained(str(p), dtype).to(device)
    from mohge.launch.convert import _checkpoint_dir, load_consolidated
    from mohge.train.checkpoint import read_meta

    step = _checkpoint_dir(path)
    model = MoHGEForCausalLM(read_meta(step)["model"])
    missing, unexpected = model.load_state_dict(load_consolidated(step), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{step}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device=device, dtype=dtype).eval()


def _megatron_prefix(path: str) -> Optional[str]:
    p = Path(path)
    prefix = str(p.with_suffix("")) if p.suffix in (".bin", ".idx") else str(p)
    return prefix if Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file() else None


def token_stream(paths: list[str], tokenizer, text_key: str = "text") -> Iterator[np.ndarray]:
    """Token ids of every document of every input, in order. `tokenizer`: a loaded tokenizer, a
    --tokenizer spelling, or None (then text inputs are an error naming --tokenizer)."""
    tok = None if tokenizer is None or isinstance(tokenizer, str) else tokenizer
    for path in paths:
        prefix = _megatron_prefix(path)
        if prefix is not None:
            from megatron.core.datasets.indexed_dataset import IndexedDataset

            index = IndexedDataset(prefix, mmap=True)
            for i in range(len(index)):
                yield np.asarray(index[i], dtype=np.int64)
            continue
        if not Path(path).is_file():
            raise DataError(f"--data {path}: no such file, and no {path}.bin/.idx pair")
        if tok is None:
            tok = open_tokenizer(tokenizer, path)
        from mohge.data.preprocess import read_documents

        for text in read_documents(path, text_key=text_key):
            yield np.asarray(tok.encode(text) + [tok.eod], dtype=np.int64)


def open_tokenizer(spec: Optional[str], first_text: str):
    """The tokenizer for text inputs; `first_text` names the input that needs one."""
    from mohge.data.tokenizers import load_tokenizer
    from mohge.launch.tokenizer_arg import SPELLINGS, resolve_tokenizer

    path = resolve_tokenizer(spec)
    if path is None:
        raise DataError(f"--data {first_text}: text needs --tokenizer ({SPELLINGS})")
    return load_tokenizer(path)


def check_inputs(paths: list[str]) -> list[str]:
    """Every --data input exists (before any work); returns the text ones (not Megatron prefixes)."""
    texts = []
    for path in paths:
        if _megatron_prefix(path) is None:
            if not Path(path).is_file():
                raise DataError(f"--data {path}: no such file, and no {path}.bin/.idx pair")
            texts.append(path)
    return texts


def windows(stream: Iterator[np.ndarray], seq_len: int, max_tokens: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Chunks of seq_len + 1 tokens overlapping by one; the last one may be shorter."""
    buf, scored = np.zeros(0, dtype=np.int64), 0
    for doc in stream:
        buf = np.concatenate([buf, doc])
        while len(buf) >= seq_len + 1:
            if max_tokens is not None and scored >= max_tokens:
                return
            yield torch.from_numpy(buf[:seq_len + 1].copy())
            scored += seq_len
            buf = buf[seq_len:]
    if len(buf) >= 2 and (max_tokens is None or scored < max_tokens):
        yield torch.from_numpy(buf.copy())


@torch.no_grad()
def perplexity(model, chunks: Iterator[torch.Tensor], batch_size: int = 8, progress: bool = True,
               device: str = "cpu") -> dict:
    """Sum of next-token losses (fp64) over every window -> {loss, perplexity, tokens}."""
    from tqdm import tqdm

    vocab = model.config["vocab_size"]
    total, count = 0.0, 0
    bar = None  # opened with the first batch that passes its checks

    def run(batch: list[torch.Tensor]) -> None:
        nonlocal total, count, bar
        for length in sorted({len(c) for c in batch}):  # full windows together, a short last one alone
            x = torch.stack([c for c in batch if len(c) == length]).to(device)
            if int(x.max()) >= vocab:
                raise DataError(f"token id {int(x.max())} >= model.vocab_size {vocab}: the data was tokenized "
                                "with another tokenizer than the model's")
            if bar is None:  # after the checks above, so that a bad input prints no bar first
                bar = tqdm(desc="eval", unit="tok", disable=not progress, file=sys.stderr)
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum")
            total += float(loss.double())
            count += x[:, 1:].numel()
            bar.update(x[:, 1:].numel())
            bar.set_postfix(loss=f"{total / count:.4f}")

    batch: list[torch.Tensor] = []
    try:
        for chunk in chunks:
            batch.append(chunk)
            if len(batch) == batch_size:
                run(batch)
                batch = []
        if batch:
            run(batch)
    finally:
        if bar is not None:
            bar.close()  # ends the bar's line, so an error after it starts on its own line
    if count == 0:
        raise DataError("--data: fewer than 2 tokens in all; nothing to score")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mohge-eval", description=__doc__.split("\n")[0].split(": ", 1)[1])
    parser.add_argument("--checkpoint", required=True, help="run dir, step_* dir, or a to-safetensors/to-hf folder")
    parser.add_argument("--data", nargs="+", required=True, help="jsonl/.txt/.parquet files or Megatron PREFIX(.bin/.idx)")
    parser.add_argument("--tokenizer", default=None,
                        help="for text data: tokenizer.json (or its directory), .model, 'bytes' or 'embedded' "
                             "(default: the export's tokenizer.json)")
    parser.add_argument("--text-key", default="text", help="jsonl/parquet field holding the text")
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default: model.max_seq_len)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=None, help="stop after about this many scored tokens")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    return run_tool("eval", lambda: _main(args))


def check_args(args: argparse.Namespace) -> None:
    """Argument ranges, before the checkpoint is read."""
    from mohge.train.errors import UsageError

    if args.batch_size < 1:
        raise UsageError(f"--batch-size: must be >= 1 (got {args.batch_size})")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UsageError(f"--max-tokens: must be >= 1 (got {args.max_tokens}); leave it out to score all the data")
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError(f"--seq-len: must be >= 1 (got {args.seq_len}); leave it out for model.max_seq_len")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device}: not a torch device; use cpu or cuda[:N]") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise UsageError(f"--device {args.device}: no such CUDA device here ({torch.cuda.device_count()} visible); "
                         "use --device cpu")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UsageError(f"--json {args.json}: its directory does not exist; create it or write the file elsewhere")


def _main(args: argparse.Namespace) -> int:
    from mohge.train.errors import hide_megatron_notices

    check_args(args)
    hide_megatron_notices()  # Megatron PREFIX inputs import megatron-core
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = load_model(args.checkpoint, dtype, args.device)
    max_len = model.config["max_seq_len"]
    seq_len = args.seq_len if args.seq_len is not None else max_len
    if seq_len > max_len:
        raise DataError(f"--seq-len {seq_len}: must be in 1..{max_len} (the model's max_seq_len)")
    tokenizer = args.tokenizer
    if tokenizer is None and (Path(args.checkpoint) / "tokenizer.json").is_file():
        tokenizer = str(Path(args.checkpoint) / "tokenizer.json")
    texts = check_inputs(args.data)
    if texts:  # loaded now: a bad --tokenizer is reported before any progress output
        tokenizer = open_tokenizer(tokenizer, texts[0])
        if tokenizer.vocab_size > model.config["vocab_size"]:
            named = f"--tokenizer {args.tokenizer}" if args.tokenizer else f"{args.checkpoint}/tokenizer.json"
            raise DataError(f"{named}: {tokenizer.vocab_size} tokens but "
                            f"model.vocab_size is {model.config['vocab_size']}; give the tokenizer the model was "
                            "trained with")
    chunks = windows(token_stream(args.data, tokenizer, args.text_key), seq_len, args.max_tokens)
    result = perplexity(model, chunks, args.batch_size, not args.no_progress, args.device)
    result.update(checkpoint=args.checkpoint, data=args.data, seq_len=seq_len)
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  tokens {result['tokens']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
