"""What a checkpoint save wrote, and whether a checkpoint is still that before anything reads it.

Every save records the size and CRC-32 of each file of the checkpoint in ``checksums.json``
(:func:`record_manifest`: each rank sums the files it wrote, rank 0 writes the record, before the
directory moves into place). :func:`checkpoint_problem` says what is wrong with a checkpoint, or
None: a file its records name missing, shorter or longer, or with other contents; its ``.metadata``
unreadable or asking to run code (read by the restricted unpickler of ``compat.safe_load``); a
storage file shorter than ``.metadata`` needs. Checkpoints written before the record existed are
checked against ``.metadata`` alone. Resume, ``checkpoint.finetune_from`` and the tools check
before loading (``checkpoint.resolve_checkpoint_dir``).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import Optional

import torch.distributed as dist

from megatron_apex.compat import safe_load

MANIFEST = "checksums.json"
_CHUNK = 8 << 20


def file_crc32(path: str) -> str:
    """CRC-32 of a file, as 8 hex digits (zlib's: about as fast as the disk reads)."""
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                return f"{crc:08x}"
            crc = zlib.crc32(block, crc)


def _own_files(directory: str, rank: int) -> list:
    """The files of a checkpoint directory that ``rank`` wrote: torch's ``__{rank}_{i}.distcp`` shards,
    and on rank 0 everything that is not another rank's shard (``.metadata``, ``common.pt``, ...)."""
    mine = []
    for name in sorted(os.listdir(directory)):
        m = re.match(r"__(\d+)_", name)
        if (int(m.group(1)) == rank) if m else (rank == 0 and name != MANIFEST):
            mine.append(name)
    return mine


class ManifestError(RuntimeError):
    """A rank could not sum its files; raised on every rank, naming it."""


def record_manifest(directory: str, rank: int, world_size: int) -> None:
    """Every rank sums its own files; rank 0 writes ``checksums.json`` (a collective). A rank that cannot
    read its files still takes part, and every rank raises :class:`ManifestError` naming it."""
    try:
        own = {name: {"size": os.path.getsize(os.path.join(directory, name)),
                      "crc32": file_crc32(os.path.join(directory, name))} for name in _own_files(directory, rank)}
    except OSError as exc:
        own = f"rank {rank}: {type(exc).__name__}: {exc}"  # a failure, told to the others in the gather
    parts = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(parts, own)
    else:
        parts = [own]
    failed = next((part for part in parts if isinstance(part, str)), None)
    if failed is not None:
        raise ManifestError(failed)
    if rank == 0:
        _write_manifest(directory, {"version": 1, "files": {name: entry for part in parts for name, entry in part.items()}})


def _write_manifest(directory: str, manifest: dict) -> None:
    """``checksums.json``, atomically (a temporary file, synced, renamed over it)."""
    tmp = os.path.join(directory, f".{MANIFEST}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, MANIFEST))


def read_metadata(path: str):
    """The torch distributed-checkpoint metadata of an ``iter_*`` directory (restricted unpickler; a truncated
    or foreign file, or one that asks to run code, raises ``compat.safe_load.UnsafeFileError``)."""
    where = os.path.join(path, ".metadata")
    with open(where, "rb") as f:
        return safe_load.load_metadata(f, where)


def checkpoint_problem(path: str, checksums: bool = True) -> Optional[str]:
    """What makes the checkpoint in ``path`` unusable, in one line, or None when it is intact.
    ``checksums=False`` compares sizes only (no file is read through). A ``.metadata`` that asks to run
    code is not a damage to fall back from: it raises ``compat.safe_load.UnsafeFileError``."""
    for name in (".metadata", "common.pt"):
        if not os.path.isfile(os.path.join(path, name)):
            return f"{path}: {name} is missing, the checkpoint is incomplete"
    try:
        meta = read_metadata(path)  # a .metadata that asks to run code raises UnsafeFileError: refused, never skipped
    except OSError as exc:
        return f"{os.path.join(path, '.metadata')}: unreadable ({exc})"
    needed = {}
    for info in meta.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{file}: missing, the checkpoint is incomplete (its .metadata names it)"
        if os.path.getsize(file) < end:
            return f"{file}: {os.path.getsize(file)} bytes where .metadata needs {end}: truncated"
    record = os.path.join(path, MANIFEST)
    if not os.path.isfile(record):
        return None  # saved before the record existed: .metadata's sizes are all there is to compare
    try:
        with open(record, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{record}: unreadable ({type(exc).__name__}: {exc})"
    for name, entry in sorted(files.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{file}: missing (the save wrote it)"
        size = os.path.getsize(file)
        if size != entry["size"]:
            return f"{file}: {size} bytes where the save wrote {entry['size']} ({'truncated' if size < entry['size'] else 'grown'})"
        if checksums:
            crc = file_crc32(file)
            if crc != entry["crc32"]:
                return f"{file}: its contents changed since the save (CRC-32 {crc}, saved {entry['crc32']})"
    return None


def update_manifest(directory: str, names: list) -> None:
    """Record the current size and CRC-32 of ``names`` in a checkpoint's ``checksums.json`` (for a tool that
    rewrites a file of a checkpoint on purpose, e.g. its common state); no record, nothing to update."""
    record = os.path.join(directory, MANIFEST)
    if not os.path.isfile(record):
        return
    with open(record, encoding="utf-8") as f:
        manifest = json.load(f)
    for name in names:
        file = os.path.join(directory, name)
        manifest["files"][name] = {"size": os.path.getsize(file), "crc32": file_crc32(file)}
    _write_manifest(directory, manifest)
