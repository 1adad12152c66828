"""Checksums of a checkpoint's files: written into meta.json at save, verified before a load.

Every file of a checkpoint directory except meta.json (which holds the table and is itself
parsed strictly) is listed with its size and SHA-256. The work is split over ranks by position
in the sorted file list (file i is hashed by rank i % world), and the ranks' findings are
gathered so that every rank reaches the same verdict. A checkpoint directory lives on a file
system every rank sees (DCP's own `.metadata` is written by rank 0 alone), so any rank can hash
any file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch.distributed as dist

META = "meta.json"
_CHUNK = 1 << 22


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def file_digest(path: Path) -> dict:
    """{"size", "sha256"} of one file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def checkpoint_files(root: Path) -> list[str]:
    """Paths (relative, '/'-separated) of every file in a checkpoint except meta.json."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != META)


def _gather(local: object) -> list:
    rank, world = _rank_world()
    if world == 1:
        return [local]
    out: list = [None] * world
    dist.all_gather_object(out, local)
    return out


def compute_checksums(root: Path) -> dict[str, dict]:
    """The checksum table of a written checkpoint directory (collective when distributed)."""
    rank, world = _rank_world()
    files = checkpoint_files(root) if rank == 0 else None
    files = _gather(files)[0]  # rank 0's listing, so every rank hashes its share of the same list
    mine = {name: file_digest(root / name) for i, name in enumerate(files) if i % world == rank}
    table: dict[str, dict] = {}
    for part in _gather(mine):
        table.update(part)
    return dict(sorted(table.items()))


def verify_checksums(root: Path, table: dict[str, dict]) -> list[str]:
    """Problems found in `root` against `table` (empty when intact); the same list on every rank."""
    rank, world = _rank_world()
    problems: list[str] = []
    for i, name in enumerate(sorted(table)):
        if i % world != rank:
            continue
        path, want = root / name, table[name]
        problem = _check_one(path, want)
        if problem:
            problems.append(problem)
    return sorted(p for part in _gather(problems) for p in part)


def _check_one(path: Path, want: dict) -> Optional[str]:
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != want["size"]:
        kind = "truncated" if size < want["size"] else "longer than saved"
        return f"{path}: {kind} ({size} bytes, saved {want['size']})"
    if file_digest(path)["sha256"] != want["sha256"]:
        return f"{path}: checksum mismatch (the file changed after it was saved)"
    return None
