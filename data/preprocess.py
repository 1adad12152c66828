"""`mohge-preprocess --input FILE... --output-prefix PREFIX --tokenizer PATH [--workers N]`.

Reads jsonl (one document per line, in its `text` field), plain text (documents separated by
blank lines) or parquet (a `text` column), tokenizes with worker processes, appends the
end-of-document token to every document and writes megatron-core's indexed format
(PREFIX.bin / PREFIX.idx), which megatron's own tools and datasets read unchanged.

The pair is written under temporary names and renamed only when complete, with a manifest
(PREFIX.manifest.json) the loader checks: a failed or interrupted run leaves an existing PREFIX
as it was. Lines that are not UTF-8 are bad lines (skipped and counted with --on-bad-line skip).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from mohge.data.errors import DataError
from mohge.data.integrity import publish
from mohge.data.tokenizers import load_tokenizer
from mohge.train.errors import report


@dataclass
class BadLines:
    """Malformed jsonl lines met while reading, per file."""

    counts: dict[str, int] = field(default_factory=dict)


def read_documents(path: str, on_bad_line: str = "fail", bad: Optional[BadLines] = None,
                   text_key: str = "text") -> Iterator[str]:
    """Documents of one input file; malformed jsonl lines are skipped (and counted) or fatal."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--input {path}: no such file")
    if p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise DataError(f"{path}: parquet input needs `pip install 'mohge[parquet]'`") from err
        for batch in pq.ParquetFile(p).iter_batches(columns=[text_key]):
            yield from (t for t in batch.column(0).to_pylist() if t)
        return
    with open(p, "rb") as f:
        if p.suffix in (".jsonl", ".json"):
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    text = json.loads(raw.decode("utf-8"))[text_key]
                    if not isinstance(text, str):
                        raise TypeError(f"'{text_key}' is not a string")
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError) as err:
                    if on_bad_line == "fail":
                        raise DataError(f"{path}:{number}: malformed jsonl line ({err}); fix it or pass "
                                        "--on-bad-line skip") from err
                    if bad is not None:
                        bad.counts[path] = bad.counts.get(path, 0) + 1
                    continue
                if text:
                    yield text
        else:
            block: list[str] = []
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    if on_bad_line == "fail":
                        raise DataError(f"{path}:{number}: not UTF-8 ({err}); fix the encoding or pass "
                                        "--on-bad-line skip") from err
                    if bad is not None:
                        bad.counts[path] = bad.counts.get(path, 0) + 1
                    continue
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block)
                    block = []
            if block:
                yield "".join(block)


_worker_tokenizer = None  # one tokenizer per worker process, loaded by its initializer


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode(text: str) -> tuple[list[int], int]:
    return _worker_tokenizer.encode(text) + [_worker_tokenizer.eod], len(text.encode("utf-8"))


def preprocess(inputs: list[str], output_prefix: str, tokenizer: str, workers: int = 1,
               on_bad_line: str = "fail", progress: bool = True) -> dict:
    """Writes PREFIX.bin/.idx and returns a summary (documents, tokens, bytes, seconds, MB/s)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    import torch

    tok = load_tokenizer(tokenizer)
    dtype = np.uint16 if tok.vocab_size < 65500 else np.int32
    bad = BadLines()
    try:
        Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"--output-prefix {output_prefix}: cannot create its directory ({err})") from err
    _remove_stale_temporaries(output_prefix)
    start = time.perf_counter()
    docs = tokens = nbytes = 0
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    try:
        builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)
    except OSError as err:
        raise DataError(f"--output-prefix {output_prefix}: cannot write there ({err})") from err

    def documents() -> Iterator[str]:
        for path in inputs:
            before = docs_seen[0]
            for text in read_documents(path, on_bad_line, bad):
                docs_seen[0] += 1
                yield text
            if docs_seen[0] == before:
                raise DataError(f"--input {path}: no documents in it (empty file?)")

    docs_seen = [0]
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit="doc", desc="preprocess")
    try:
        pool_or_inline = (Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) if workers > 1
                          else _Inline(tokenizer))
        with pool_or_inline as pool:
            for ids, size in pool.imap(_encode, documents(), chunksize=64):
                builder.add_item(torch.tensor(ids, dtype=torch.int64))
                builder.end_document()
                docs += 1
                tokens += len(ids)
                nbytes += size
                if bar is not None:
                    bar.update()
        builder.finalize(tmp_prefix + ".idx")
        publish(tmp_prefix, output_prefix, tok.vocab_size, tok.eod)
    except OSError as err:  # disk full, permissions: the existing PREFIX is untouched
        raise DataError(f"--output-prefix {output_prefix}: writing failed ({err}); {output_prefix}.bin/.idx "
                        "were left as they were") from err
    finally:
        if not builder.data_file.closed:
            builder.data_file.close()
        for suffix in (".bin", ".idx", ".manifest.json"):
            Path(tmp_prefix + suffix).unlink(missing_ok=True)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    return {"documents": docs, "tokens": tokens, "bytes": nbytes, "seconds": seconds,
            "mb_per_s": nbytes / 1e6 / max(seconds, 1e-9), "tokens_per_s": tokens / max(seconds, 1e-9),
            "skipped_lines": bad.counts, "prefix": output_prefix, "tokenizer_vocab": tok.vocab_size}


def _remove_stale_temporaries(output_prefix: str) -> None:
    """Deletes PREFIX.tmp-<pid>.* left by a killed run whose process is gone (a live one is another
    run writing the same prefix: left alone)."""
    prefix = Path(output_prefix)
    for tmp in prefix.parent.glob(f"{prefix.name}.tmp-*"):
        pid = tmp.name[len(prefix.name) + 5:].split(".")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass


class _Inline:
    """Pool stand-in for --workers 1: same interface, no subprocesses."""

    def __init__(self, tokenizer: str):
        _init_worker(tokenizer)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, items, chunksize=1):
        return map(fn, items)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mohge-preprocess", description=__doc__.split("\n")[2].strip())
    parser.add_argument("--input", nargs="+", required=True, help="jsonl (text field), .txt or .parquet files")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json, its directory, a .model, 'bytes' or 'embedded'")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--on-bad-line", choices=("fail", "skip"), default="fail",
                        help="malformed jsonl lines: stop with an error, or count and skip them")
    args = parser.parse_args(argv)
    from mohge.train.errors import hide_megatron_notices

    hide_megatron_notices()  # the indexed-dataset builder imports megatron-core
    try:
        from mohge.launch.tokenizer_arg import resolve_tokenizer

        tokenizer = resolve_tokenizer(args.tokenizer) or "bytes"  # errors name --tokenizer; 'embedded' too
        summary = preprocess(args.input, args.output_prefix, tokenizer, args.workers, args.on_bad_line)
    except DataError as err:
        return report("preprocess", err)
    skipped = sum(summary["skipped_lines"].values())
    print(f"{summary['documents']} documents, {summary['tokens']} tokens, {summary['bytes'] / 1e6:.1f} MB in "
          f"{summary['seconds']:.1f}s ({summary['mb_per_s']:.1f} MB/s, {summary['tokens_per_s']:.0f} tokens/s)"
          f" -> {args.output_prefix}.bin/.idx" + (f"; skipped {skipped} malformed lines: {summary['skipped_lines']}"
                                                   if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
