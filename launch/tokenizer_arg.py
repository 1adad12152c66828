"""The `--tokenizer` spellings every tool accepts: a tokenizer.json, a directory holding one, a
sentencepiece .model, 'bytes', or 'embedded' (the demo corpus's tokenizer.json).

One resolver so that `mohge-eval`, `mohge-convert to-safetensors` and `to-hf` agree on what a
spelling means; each tool then refuses the kinds it cannot use with one line naming the flag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mohge.data.errors import DataError

SPELLINGS = "a tokenizer.json, a directory holding one, a sentencepiece .model, 'bytes' or 'embedded'"


def resolve_tokenizer(spec: Optional[str], flag: str = "--tokenizer") -> Optional[str]:
    """None/'' -> None; 'bytes' -> 'bytes'; 'embedded' -> the prepared demo tokenizer.json; a path
    (file, or directory holding tokenizer.json) -> that file, which must exist."""
    if spec in (None, ""):
        return None
    if spec == "bytes":
        return "bytes"
    if spec == "embedded":
        from mohge.data.embedded import default_dir

        path = default_dir() / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{flag} embedded: {path} does not exist; run mohge-prepare-demo first (or train once "
                            "with data.source=embedded)")
        return str(path)
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{flag} {spec}: no such file; give {SPELLINGS}")
    return str(path)
