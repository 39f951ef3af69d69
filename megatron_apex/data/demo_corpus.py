"""A small corpus every machine already has: the Python standard library's own source.

The demo (``make demo``) must run offline and be reproducible, so instead of downloading a data
set it tokenizes the ``.py`` files of ``sysconfig.get_paths()['stdlib']``. The walk is sorted,
test suites and site-packages are skipped, the total is capped, large files are cut into
top-level chunks (at ``def``/``class`` lines) so documents have a training-friendly size, and the
train/valid split is decided by a hash of each file's relative path -- so the same Python version
always produces byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
from typing import Iterator, Optional

logger = logging.getLogger(__name__)

__all__ = ["build_demo_corpus", "iter_stdlib_documents"]

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


def _chunks(source: str, max_chars: int) -> Iterator[str]:
    """Cut ``source`` before top-level ``def``/``class``/decorator lines into pieces of at most
    about ``max_chars`` (a single huge top-level block stays whole)."""
    if len(source) <= max_chars:
        yield source
        return
    current: list[str] = []
    size = 0
    for line in source.splitlines(keepends=True):
        boundary = line.startswith(("def ", "class ", "async def ", "@"))
        if boundary and size >= max_chars // 2 and current:
            yield "".join(current)
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        yield "".join(current)


def iter_stdlib_documents(
    stdlib_dir: Optional[str] = None, max_bytes: int = 8_000_000, max_doc_chars: int = 16_000
) -> Iterator[dict]:
    """Yield ``{"text", "source"}`` documents in a deterministic order until ``max_bytes`` of
    source text have been used."""
    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    used = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as handle:
                    source = handle.read().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if not source.strip():
                continue
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            for i, chunk in enumerate(_chunks(source, max_doc_chars)):
                if not chunk.strip():
                    continue
                yield {"text": chunk, "source": f"stdlib/{rel}#{i}"}
            used += len(source.encode("utf-8"))
            if used >= max_bytes:
                return


def _is_valid(source: str, valid_percent: float) -> bool:
    file_part = source.split("#", 1)[0]
    bucket = int(hashlib.sha256(file_part.encode("utf-8")).hexdigest()[:8], 16) % 10000
    return bucket < valid_percent * 100


def build_demo_corpus(
    output_dir: str, max_bytes: int = 8_000_000, valid_percent: float = 5.0, stdlib_dir: Optional[str] = None
) -> dict:
    """Write ``train.jsonl`` and ``valid.jsonl`` under ``output_dir``; returns counts.

    Whole files go to one side of the split (chunks of a file never straddle it). If the hash
    puts no file in ``valid`` (tiny caps), the last train file is moved there so neither is empty.
    """
    os.makedirs(output_dir, exist_ok=True)
    train, valid = [], []
    for doc in iter_stdlib_documents(stdlib_dir, max_bytes):
        (valid if _is_valid(doc["source"], valid_percent) else train).append(doc)
    if not valid and train:
        last_file = train[-1]["source"].split("#", 1)[0]
        valid = [d for d in train if d["source"].split("#", 1)[0] == last_file]
        train = [d for d in train if d["source"].split("#", 1)[0] != last_file]
    if not train or not valid:
        raise ValueError(f"not enough standard-library source under {stdlib_dir or sysconfig.get_paths()['stdlib']}")
    counts = {}
    for name, docs in (("train", train), ("valid", valid)):
        path = os.path.join(output_dir, f"{name}.jsonl")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            for doc in docs:
                handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        counts[name] = {"path": path, "documents": len(docs), "bytes": os.path.getsize(path)}
    logger.info("demo corpus: %s", counts)
    return counts
