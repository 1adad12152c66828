"""A .bin/.idx pair's manifest (PREFIX.manifest.json), written by mohge-preprocess and checked by
the loader, and the atomic publication of a freshly written pair.

The manifest records both files' sizes, the SHA-256 of the .idx and of the .bin's first and last
MiB, and the tokenizer's vocabulary size and end-of-document id: an .idx belonging to another .bin,
a half-replaced pair or a corpus tokenized with another tokenizer is refused before training.
Pairs written by other tools (no manifest) are still checked for an exact .bin size.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from mohge.data.errors import DataError

MANIFEST = ".manifest.json"
_EDGE = 1 << 20


def _bin_fingerprint(path: str) -> str:
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(_EDGE, size - _EDGE))
            h.update(f.read())
    return h.hexdigest()


def _idx_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def describe_pair(bin_path: str, idx_path: str, vocab_size: int, eod: int) -> dict:
    return {"bin_bytes": os.path.getsize(bin_path), "idx_bytes": os.path.getsize(idx_path),
            "bin_fingerprint": _bin_fingerprint(bin_path), "idx_sha256": _idx_digest(idx_path),
            "vocab_size": vocab_size, "eod": eod}


def publish(tmp_prefix: str, prefix: str, vocab_size: int, eod: int) -> None:
    """Moves tmp_prefix.{bin,idx} onto prefix.{bin,idx}. The new manifest goes first, so a crash
    between the renames leaves a pair that fails its manifest check instead of a silent mix."""
    manifest = describe_pair(tmp_prefix + ".bin", tmp_prefix + ".idx", vocab_size, eod)
    tmp_manifest = tmp_prefix + MANIFEST
    Path(tmp_manifest).write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_manifest, prefix + MANIFEST)
    os.replace(tmp_prefix + ".bin", prefix + ".bin")
    os.replace(tmp_prefix + ".idx", prefix + ".idx")


def check_manifest(prefix: str, vocab_size: Optional[int] = None, eod: Optional[int] = None) -> bool:
    """DataError if the pair does not match its manifest (or the tokenizer); False if none exists."""
    path = Path(prefix + MANIFEST)
    if not path.is_file():
        return False
    try:
        want = json.loads(path.read_text())
        fields = {k: want[k] for k in ("bin_bytes", "idx_bytes", "bin_fingerprint", "idx_sha256")}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: unreadable ({err}); re-run mohge-preprocess or delete the manifest") from err
    have = describe_pair(prefix + ".bin", prefix + ".idx", 0, 0)
    if any(have[k] != v for k, v in fields.items()):
        raise DataError(f"{prefix}.bin/.idx: the pair does not match {path.name} (a file was replaced, damaged or "
                        "half-written); re-run mohge-preprocess for this prefix")
    if vocab_size is not None and want.get("vocab_size") not in (None, vocab_size):
        raise DataError(f"data.tokenizer: {prefix} was tokenized with a {want['vocab_size']}-token vocabulary but "
                        f"the configured tokenizer has {vocab_size}; use the tokenizer it was preprocessed with")
    if eod is not None and want.get("eod") not in (None, eod):
        raise DataError(f"data.tokenizer: {prefix} ends documents with token {want['eod']} but the configured "
                        f"tokenizer's end-of-document id is {eod}; use the tokenizer it was preprocessed with")
    return True
