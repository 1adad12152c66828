"""`mohge-train-tokenizer --input FILE... --vocab-size N --output DIR`: byte-level BPE, offline."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from mohge.data.errors import DataError
from mohge.data.tokenizers import EOD_TOKEN, HFTokenizer
from mohge.train.errors import report


def iter_texts(paths: list[str]) -> Iterator[str]:
    """Documents of jsonl (`text` field), .txt and .parquet files, as preprocessing reads them."""
    from mohge.data.preprocess import read_documents

    for path in paths:
        yield from read_documents(path, on_bad_line="skip")


def train_bpe(inputs: list[str], vocab_size: int, output: str, special_tokens: Optional[list[str]] = None,
              min_frequency: int = 2) -> HFTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    for path in inputs:
        if not Path(path).is_file():
            raise DataError(f"--input {path}: no such file")
    specials = [EOD_TOKEN, *(special_tokens or [])]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(iter_texts(inputs), trainer=trainer)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return HFTokenizer(str(out / "tokenizer.json"))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mohge-train-tokenizer", description=__doc__.split("\n")[0].split(": ", 1)[1])
    parser.add_argument("--input", nargs="+", required=True, help="jsonl (text field), .txt or .parquet files")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output", required=True, help="directory; writes DIR/tokenizer.json")
    parser.add_argument("--special-tokens", nargs="*", default=[], help=f"extra special tokens besides {EOD_TOKEN}")
    parser.add_argument("--min-frequency", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        tok = train_bpe(args.input, args.vocab_size, args.output, args.special_tokens, args.min_frequency)
    except DataError as err:
        return report("train-tokenizer", err)
    print(f"wrote {args.output}/tokenizer.json: vocab {tok.vocab_size}, eod {tok.eod}, "
          f"{time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
