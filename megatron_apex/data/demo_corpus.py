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

    Whole files go to one side of the split (chunks of a file never straddle it). With tiny caps
    the hash may put no file, or more text than train, into ``valid``; then the smallest file alone
    becomes ``valid``, so that neither side is empty and ``valid`` is always the smaller part.
    Raises ValueError for a ``valid_percent`` outside (0, 100), a cap <= 0, or too little source.
    """
    if not 0 < valid_percent < 100:
        raise ValueError(f"valid_percent={valid_percent}: must lie in (0, 100)")
    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes}: must be positive")
    by_file: dict = {}  # file -> its documents, in walk order
    for doc in iter_stdlib_documents(stdlib_dir, max_bytes):
        by_file.setdefault(doc["source"].split("#", 1)[0], []).append(doc)
    size = {f: sum(len(d["text"]) for d in docs) for f, docs in by_file.items()}
    valid_files = {f for f in by_file if _is_valid(f, valid_percent)}

    def valid_share(chosen):
        return sum(size[f] for f in chosen), sum(size[f] for f in by_file if f not in chosen)

    valid_bytes, train_bytes = valid_share(valid_files)
    if not valid_files or valid_bytes >= train_bytes:
        valid_files = {min(by_file, key=lambda f: size[f])} if by_file else set()
        valid_bytes, train_bytes = valid_share(valid_files)
    if not valid_files or valid_bytes >= train_bytes:
        raise ValueError(f"not enough standard-library source under {stdlib_dir or sysconfig.get_paths()['stdlib']} "
                         f"for a train/valid split within max_bytes={max_bytes}")
    os.makedirs(output_dir, exist_ok=True)
    train = [d for f, docs in by_file.items() if f not in valid_files for d in docs]
    valid = [d for f, docs in by_file.items() if f in valid_files for d in docs]
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
