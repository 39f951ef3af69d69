"""Reading JSONL corpora: input discovery, (de)compression and chunking into line blocks.

Corpora are tens to hundreds of GB, so nothing here holds more than one block (a few MB of
lines) per reader. Blocks are raw bytes cut at line boundaries: they are cheap to send to a worker
process (one pickle of one ``bytes`` object) and let workers do the JSON parsing, the UTF-8
checks and the tokenization in parallel. Each block carries its file and first line number so that
a bad line can be reported as ``file:line`` no matter which worker saw it.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import os
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

logger = logging.getLogger(__name__)

__all__ = [
    "JSONL_SUFFIXES", "BAD_REASONS", "InputError", "Block", "expand_inputs", "iter_blocks", "iter_texts",
    "parse_line", "field_text",
]

_COMPRESSED = ("", ".gz", ".zst", ".zstd", ".bz2", ".xz")
# Files a directory input contributes (matched case-insensitively): plain or compressed JSON lines.
JSONL_SUFFIXES = tuple(base + comp for base in (".jsonl", ".ndjson", ".json") for comp in _COMPRESSED)

# Why a line (or one key of it) is unusable; "invalid_utf8" also covers texts with lone surrogates
# (valid JSON escapes such as \ud800 that no tokenizer can encode).
BAD_REASONS = ("invalid_utf8", "invalid_json", "not_an_object", "missing_key", "non_string", "empty")
_MAX_LOGGED = 20  # skipped lines logged one by one by iter_texts (all are counted)


class InputError(ValueError):
    """An input path is missing, unreadable, holds no JSONL files, or cannot be decompressed."""


@dataclass
class Block:
    """A run of complete lines from one file."""

    file_index: int
    first_line: int  # 1-based line number of the first line in ``data``
    data: bytes
    raw_end: int  # on-disk (compressed) bytes of the file consumed so far, for progress


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Files and directories -> sorted list of JSONL files. Directories are walked recursively
    (symbolic links to directories included, each real directory once) and contribute files ending
    in one of :data:`JSONL_SUFFIXES` (any case) in sorted order (deterministic output); the other
    files found there are logged. Raises :class:`InputError` for anything missing or unreadable,
    before any work starts."""
    files: list[str] = []
    for path in inputs:
        if os.path.isdir(path):
            found, ignored, visited = [], [], set()
            for root, dirs, names in os.walk(path, followlinks=True):
                real = os.path.realpath(root)
                if real in visited:  # a link back into the tree
                    dirs[:] = []
                    continue
                visited.add(real)
                dirs.sort()
                for name in sorted(names):
                    stem = os.path.join(root, name.rsplit(".", 1)[0])
                    # skip our own sidecars ({prefix}.json next to {prefix}.idx) in mixed directories
                    if name.lower().endswith(".json") and os.path.exists(stem + ".idx"):
                        continue
                    (found if name.lower().endswith(JSONL_SUFFIXES) else ignored).append(os.path.join(root, name))
            if not found:
                raise InputError(f"input directory {path!r} contains no JSONL files ({', '.join(JSONL_SUFFIXES)})")
            if ignored:
                shown = ", ".join(repr(os.path.relpath(f, path)) for f in ignored[:5])
                logger.warning("input directory %s: ignoring %d file(s) that are not JSON lines by their name: %s%s",
                               path, len(ignored), shown, ", ..." if len(ignored) > 5 else "")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise InputError(f"input {path!r} does not exist")
    if not files:
        raise InputError("no input files given")
    unique, seen = [], {}
    for path in files:
        if not os.access(path, os.R_OK):
            raise InputError(f"input {path!r} is not readable")
        stat = os.stat(path)
        first = seen.setdefault((stat.st_dev, stat.st_ino), path)  # same file (also via links) counts once
        if first is path:
            unique.append(path)
        else:
            logger.warning("input %s is the same file as %s: reading it once", path, first)
    return unique


class _ZstdStream:
    """Decompressed bytes of a ``.zst`` file, frame after frame.

    zstandard's ``stream_reader`` returns what it has when the file ends inside a frame, without
    saying so, which would make a truncated download look like a shorter corpus; this reader
    raises :class:`InputError` instead. ``read(size)`` returns at most ``size`` bytes (b"" at the
    end). The compressed input is fed in pieces sized by the compression ratio seen so far, so that
    one piece decompresses to about ``size`` bytes: a highly compressible shard does not come out
    whole (memory stays about one block, as for plain and gzip files).
    """

    _MIN_FEED, _MAX_FEED = 1 << 12, 1 << 20

    def __init__(self, raw, path: str):
        import zstandard

        self.raw, self.path = raw, path
        # Frames written with a long window (zstd --long=N, up to 2 GiB) decode with a window that large.
        self._new = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj
        self._error = zstandard.ZstdError
        self._obj, self._pending = None, b""
        self._out, self._pos = b"", 0
        self._feed = 1 << 16

    def read(self, size: int = -1) -> bytes:
        limit = size if size is not None and size > 0 else 1 << 22
        if self._pos >= len(self._out):
            self._out, self._pos = self._decompress(limit), 0
        out = self._out[self._pos : self._pos + limit]
        self._pos += len(out)
        return out

    def _decompress(self, want: int) -> bytes:
        while True:
            data = self._pending or self.raw.read(self._feed)
            self._pending = b""
            if not data:
                if self._obj is not None and not self._obj.eof:
                    raise InputError(f"{self.path}: truncated zstd input (the file ends inside a compressed frame)")
                return b""
            if self._obj is None or self._obj.eof:  # a new frame (files may hold several)
                self._obj = self._new()
            try:
                out = self._obj.decompress(data)
            except self._error as exc:
                raise InputError(f"{self.path}: cannot decompress ({exc}); the file is corrupt or not zstd") from exc
            if self._obj.eof:
                self._pending = self._obj.unused_data
            if out:
                ratio = len(out) / max(len(data) - len(self._pending), 1)
                self._feed = int(min(max(want / ratio, self._MIN_FEED), self._MAX_FEED))
                return out

    def close(self) -> None:
        pass


class _Opened:
    """A decompressed byte stream plus the raw file underneath (whose position gives progress)."""

    def __init__(self, path: str):
        self.raw = open(path, "rb")
        magic = self.raw.read(4)
        self.raw.seek(0)
        name = path.lower()
        if name.endswith(".gz") or magic[:2] == b"\x1f\x8b":
            self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb")
        elif name.endswith((".zst", ".zstd")) or magic == b"\x28\xb5\x2f\xfd":
            self.stream = _ZstdStream(self.raw, path)
        elif name.endswith(".bz2") or magic[:3] == b"BZh":
            self.stream = bz2.BZ2File(self.raw, mode="rb")
        elif name.endswith(".xz") or magic == b"\xfd7zX":
            self.stream = lzma.LZMAFile(self.raw, mode="rb")
        else:
            self.stream = self.raw

    def read(self, size: int) -> bytes:
        """Up to about ``size`` decompressed bytes; :class:`InputError` naming the file if the data
        cannot be decompressed (corrupt, truncated, or not compressed at all)."""
        try:
            return self.stream.read(size)
        except gzip.BadGzipFile as exc:
            raise InputError(f"{self.raw.name}: not a gzip file ({exc})") from exc
        except (EOFError, zlib.error, lzma.LZMAError) as exc:
            raise InputError(f"{self.raw.name}: cannot decompress ({exc}); the file is corrupt or truncated") from exc
        except OSError as exc:  # bz2's errors; a plain file's read errors pass through as they are
            if self.stream is self.raw:
                raise
            raise InputError(f"{self.raw.name}: cannot decompress ({exc}); the file is corrupt or truncated") from exc

    def close(self) -> None:
        if self.stream is not self.raw:
            self.stream.close()
        self.raw.close()


def iter_blocks(files: list[str], block_bytes: int = 4 << 20) -> Iterator[Block]:
    """Yield :class:`Block` objects of roughly ``block_bytes`` each, cut at newlines."""
    if block_bytes < 1:
        raise ValueError(f"block_bytes must be >= 1, got {block_bytes}")
    for file_index, path in enumerate(files):
        opened = _Opened(path)
        try:
            line_no = 1
            pending = b""
            first = True
            while True:
                data = opened.read(block_bytes)
                if not data:
                    break
                if first:  # a UTF-8 byte order mark (written by some editors) is not part of the first line
                    first = False
                    if data.startswith(b"\xef\xbb\xbf"):
                        data = data[3:]
                        if not data:
                            continue
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


def parse_line(raw: bytes) -> tuple:
    """``(record, None, None)`` for a line holding a JSON object, else ``(None, reason, detail)``
    with a reason from :data:`BAD_REASONS`. Blank lines are the caller's business."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, "invalid_utf8", str(exc)[:120]
    try:
        record = json.loads(line)
    except ValueError as exc:
        return None, "invalid_json", str(exc)[:120]
    except RecursionError:
        return None, "invalid_json", "nested too deeply"
    if not isinstance(record, dict):
        return None, "not_an_object", f"top-level {type(record).__name__}"
    return record, None, None


def field_text(record: dict, key: str) -> tuple:
    """``(text, None, None)`` for a non-blank string under ``key``, else ``(None, reason, detail)``."""
    value = record.get(key)
    if value is None and key not in record:
        return None, "missing_key", f"no key {key!r}"
    if not isinstance(value, str):
        return None, "non_string", f"{key!r} is {type(value).__name__}"
    if not value or value.isspace():
        return None, "empty", f"{key!r} is empty"
    return value, None, None


def iter_texts(
    inputs: Iterable[str], json_key: str = "text", max_docs: Optional[int] = None, skipped: Optional[dict] = None
) -> Iterator[str]:
    """Stream the ``json_key`` strings of JSONL inputs, skipping unusable lines.

    Every skipped line is counted by reason (:data:`BAD_REASONS`) in ``skipped`` when a dict is
    given, and the first few are logged as ``file:line: reason (detail)``, as preprocessing does.
    Texts that cannot be encoded as UTF-8 (lone surrogates) count as ``invalid_utf8``: no
    tokenizer can take them. Blank lines are not counted.
    """
    skipped = {} if skipped is None else skipped
    files = expand_inputs(inputs)
    count = logged = 0
    for block in iter_blocks(files):
        for offset, raw in enumerate(block.data.split(b"\n")):
            if not raw.strip():
                continue
            record, reason, detail = parse_line(raw)
            if record is not None:
                text, reason, detail = field_text(record, json_key)
                if text is not None:
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError as exc:
                        reason, detail = "invalid_utf8", str(exc)[:120]
            if reason is not None:
                skipped[reason] = skipped.get(reason, 0) + 1
                if logged < _MAX_LOGGED:
                    logged += 1
                    logger.warning("skipped %s:%d: %s (%s)", files[block.file_index], block.first_line + offset,
                                   reason, detail)
                continue
            yield text
            count += 1
            if max_docs is not None and count >= max_docs:
                return
