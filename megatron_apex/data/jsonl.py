"""Reading JSONL corpora: input discovery, (de)compression and chunking into line blocks.

Corpora are tens to hundreds of GB, so nothing here holds more than one block (a few MB of
lines) per reader. Blocks are raw bytes cut at line boundaries: they are cheap to send to a worker
process (one pickle of one ``bytes`` object) and let workers do the JSON parsing, the UTF-8
checks and the tokenization in parallel. Each block carries its file and first line number so that
a bad line can be reported as ``file:line`` no matter which worker saw it.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

logger = logging.getLogger(__name__)

__all__ = ["JSONL_SUFFIXES", "InputError", "Block", "expand_inputs", "iter_blocks", "iter_texts"]

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".jsonl.zstd", ".ndjson")


class InputError(ValueError):
    """An input path is missing, unreadable or holds no JSONL files."""


@dataclass
class Block:
    """A run of complete lines from one file."""

    file_index: int
    first_line: int  # 1-based line number of the first line in ``data``
    data: bytes
    raw_end: int  # on-disk (compressed) bytes of the file consumed so far, for progress


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Files and directories -> sorted list of JSONL files. Directories are walked recursively and
    contribute files ending in one of :data:`JSONL_SUFFIXES` in sorted order (deterministic output).
    Raises :class:`InputError` for anything missing or unreadable, before any work starts."""
    files: list[str] = []
    for path in inputs:
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    stem = os.path.join(root, name.rsplit(".", 1)[0])
                    # skip our own sidecars ({prefix}.json next to {prefix}.idx) in mixed directories
                    if name.endswith(JSONL_SUFFIXES) and not (name.endswith(".json") and os.path.exists(stem + ".idx")):
                        found.append(os.path.join(root, name))
            if not found:
                raise InputError(f"input directory {path!r} contains no JSONL files ({', '.join(JSONL_SUFFIXES)})")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise InputError(f"input {path!r} does not exist")
    if not files:
        raise InputError("no input files given")
    for path in files:
        if not os.access(path, os.R_OK):
            raise InputError(f"input {path!r} is not readable")
    return files


class _Opened:
    """A decompressed byte stream plus the raw file underneath (whose position gives progress)."""

    def __init__(self, path: str):
        self.raw = open(path, "rb")
        magic = self.raw.read(4)
        self.raw.seek(0)
        if path.endswith(".gz") or magic[:2] == b"\x1f\x8b":
            self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb")
        elif path.endswith((".zst", ".zstd")) or magic == b"\x28\xb5\x2f\xfd":
            import zstandard

            self.stream = zstandard.ZstdDecompressor().stream_reader(self.raw, read_size=1 << 20)
        else:
            self.stream = self.raw

    def close(self) -> None:
        if self.stream is not self.raw:
            self.stream.close()
        self.raw.close()


def iter_blocks(files: list[str], block_bytes: int = 4 << 20) -> Iterator[Block]:
    """Yield :class:`Block` objects of roughly ``block_bytes`` each, cut at newlines."""
    for file_index, path in enumerate(files):
        opened = _Opened(path)
        try:
            line_no = 1
            pending = b""
            while True:
                data = opened.stream.read(block_bytes)
                if not data:
                    break
                data = pending + data if pending else data
                cut = data.rfind(b"\n")
                if cut < 0:
                    pending = data  # a single line longer than a block: keep reading
                    continue
                block, pending = data[: cut + 1], data[cut + 1 :]
                yield Block(file_index, line_no, block, opened.raw.tell())
                line_no += block.count(b"\n")
            if pending:
                yield Block(file_index, line_no, pending, opened.raw.tell())
        finally:
            opened.close()


def iter_texts(
    inputs: Iterable[str], json_key: str = "text", max_docs: Optional[int] = None
) -> Iterator[str]:
    """Stream the ``json_key`` strings of JSONL inputs, silently skipping unusable lines.

    Used where bad lines need no accounting (tokenizer training); preprocessing uses the
    counting parser in :mod:`megatron_apex.data.preprocess` instead.
    """
    import json

    count = 0
    for block in iter_blocks(expand_inputs(inputs)):
        for line in block.data.split(b"\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            text = record.get(json_key) if isinstance(record, dict) else None
            if isinstance(text, str) and text:
                yield text
                count += 1
                if max_docs is not None and count >= max_docs:
                    return
