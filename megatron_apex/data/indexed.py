"""Streaming writer and light reader for Megatron's indexed dataset (``.bin`` / ``.idx``).

The byte layout is megatron-core's ``MMIDIDX`` version 1 (see docs/formats.md, "Indexed datasets"); files
written here are read by ``megatron.core.datasets.indexed_dataset.IndexedDataset`` unchanged.

Why not megatron-core's ``IndexedDatasetBuilder``?

* it takes one torch tensor per document and keeps Python lists of every length and document
  boundary, so memory grows with the corpus (tens of bytes per document) and each document costs
  several Python calls;
* it writes straight to the final file names, so a killed run leaves a pair that looks complete;
* importing it pulls in torch and megatron-core (seconds per process).

:class:`IndexedDatasetWriter` instead appends whole numpy chunks, spills the per-sequence lengths
and the document boundaries to temporary side files (memory stays flat however large the corpus),
writes everything under temporary names and publishes it with fsync + rename, ``.bin`` first and
``.idx`` last: an ``.idx`` next to a ``.bin`` therefore always means "complete".
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import struct
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "IndexedDatasetWriter",
    "IndexedDatasetReader",
    "IndexedDatasetError",
    "index_fingerprint",
    "max_token_id",
    "read_sidecar",
    "optimal_dtype",
    "merge_datasets",
    "fsync_directory",
    "remove_stale_temporaries",
]

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER_BYTES = 34  # magic (9), version (8), dtype code (1), sequence count (8), document-index length (8)
# megatron-core DType codes (indexed_dataset.DType); 6/7 are float64/float32 there.
_DTYPE_TO_CODE = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
_CODE_TO_DTYPE = {code: dtype for dtype, code in _DTYPE_TO_CODE.items()}
_COPY_ITEMS = 1 << 22  # elements per chunk when streaming index arrays


class IndexedDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair is missing, damaged, or its two files do not belong together."""


def optimal_dtype(vocab_size: Optional[int]) -> np.dtype:
    """Same rule as megatron-core ``DType.optimal_dtype``: uint16 below 65500 ids, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def fsync_directory(path: str) -> None:
    """Make renames inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(prefix: str) -> list[str]:
    """Delete ``{prefix}.*.tmp<pid>`` files left by killed runs (their pid no longer exists).

    They never look like a finished dataset, but they can be large; a later run for the same
    prefix is the natural moment to reclaim the space. Files of live processes are left alone.
    """
    removed = []
    for path in glob.glob(glob.escape(prefix) + ".*.tmp*"):
        match = re.search(r"\.tmp(\d+)$", path)
        if match and not _pid_alive(int(match.group(1))):
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    if removed:
        logger.info("removed %d stale temporary file(s) of an interrupted run: %s", len(removed), removed)
    return removed


class IndexedDatasetWriter:
    """Append documents to ``{prefix}.bin`` / ``{prefix}.idx`` and publish them atomically.

    Usage::

        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_documents(tokens, lengths)   # one sequence per document
        # leaving the block without an exception calls finalize(); an exception calls abort()
    """

    def __init__(self, prefix: str, dtype, buffer_bytes: int = 8 << 20):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DTYPE_TO_CODE:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self.bin_path = prefix + ".bin"
        self.idx_path = prefix + ".idx"
        remove_stale_temporaries(prefix)
        suffix = f".tmp{os.getpid()}"
        self._tmp_bin = self.bin_path + suffix
        self._tmp_idx = self.idx_path + suffix
        self._tmp_lengths = prefix + ".lengths" + suffix
        self._tmp_docs = prefix + ".docs" + suffix
        self._bin = open(self._tmp_bin, "wb", buffering=buffer_bytes)
        self._lengths = open(self._tmp_lengths, "wb", buffering=1 << 20)
        self._docs = open(self._tmp_docs, "wb", buffering=1 << 20)
        self.sequence_count = 0
        self.document_count = 0
        self.token_count = 0
        self._closed = False

    # -- appending -------------------------------------------------------------------------------
    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` documents whose tokens are concatenated in ``tokens``."""
        lengths = np.asarray(lengths, dtype=np.int32)
        if len(lengths) == 0:
            return
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        if int(lengths.sum(dtype=np.int64)) != tokens.size:
            raise ValueError("sum(lengths) does not match the number of tokens")
        self._bin.write(memoryview(tokens).cast("B"))
        self._lengths.write(lengths.tobytes())
        ends = np.arange(self.sequence_count + 1, self.sequence_count + len(lengths) + 1, dtype=np.int64)
        self._docs.write(ends.tobytes())
        self.sequence_count += len(lengths)
        self.document_count += len(lengths)
        self.token_count += tokens.size

    def add_dataset(self, prefix: str) -> None:
        """Append every document of an existing dataset (streamed; used by merge)."""
        reader = IndexedDatasetReader(prefix)
        if reader.dtype != self.dtype:
            raise ValueError(f"{prefix}: dtype {reader.dtype} differs from the output dtype {self.dtype}")
        self._bin.flush()
        with open(reader.bin_path, "rb") as src:
            shutil.copyfileobj(src, self._bin, 16 << 20)
        for start in range(0, reader.sequence_count, _COPY_ITEMS):
            self._lengths.write(np.asarray(reader.sequence_lengths[start : start + _COPY_ITEMS]).tobytes())
        doc_idx = reader.document_indices
        for start in range(1, len(doc_idx), _COPY_ITEMS):
            chunk = np.asarray(doc_idx[start : start + _COPY_ITEMS], dtype=np.int64) + self.sequence_count
            self._docs.write(chunk.tobytes())
        self.sequence_count += reader.sequence_count
        self.document_count += reader.document_count
        self.token_count += int(reader.token_count)
        reader.close()

    # -- publishing ------------------------------------------------------------------------------
    def _write_index(self) -> None:
        """Stream the ``.idx`` from the spilled lengths/boundaries (memory: one chunk at a time)."""
        itemsize = self.dtype.itemsize
        with open(self._tmp_idx, "wb", buffering=8 << 20) as idx:
            idx.write(_MAGIC)
            idx.write(struct.pack("<Q", _VERSION))
            idx.write(struct.pack("<B", _DTYPE_TO_CODE[self.dtype]))
            idx.write(struct.pack("<Q", self.sequence_count))
            idx.write(struct.pack("<Q", self.document_count + 1))
            with open(self._tmp_lengths, "rb") as lengths:
                shutil.copyfileobj(lengths, idx, 16 << 20)
            offset = 0
            with open(self._tmp_lengths, "rb") as lengths:
                while True:
                    chunk = np.frombuffer(lengths.read(4 * _COPY_ITEMS), dtype=np.int32)
                    if chunk.size == 0:
                        break
                    sizes = chunk.astype(np.int64) * itemsize
                    pointers = np.empty_like(sizes)
                    pointers[0] = offset
                    np.cumsum(sizes[:-1], out=pointers[1:])
                    pointers[1:] += offset
                    offset += int(sizes.sum())
                    idx.write(pointers.tobytes())
            idx.write(np.zeros(1, dtype=np.int64).tobytes())
            with open(self._tmp_docs, "rb") as docs:
                shutil.copyfileobj(docs, idx, 16 << 20)
            idx.flush()
            os.fsync(idx.fileno())

    def finalize(self, before_index=None) -> None:
        """Publish: fsync+rename ``.bin``, call ``before_index()`` (e.g. to write a sidecar), then
        fsync+rename ``.idx`` last. An old ``.idx`` is removed first so that a stale index can never
        be paired with a new ``.bin``."""
        if self._closed:
            return
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        self._lengths.close()
        self._docs.close()
        self._write_index()
        os.unlink(self._tmp_lengths)
        os.unlink(self._tmp_docs)
        directory = os.path.dirname(os.path.abspath(self.prefix))
        if os.path.exists(self.idx_path):
            os.unlink(self.idx_path)
            fsync_directory(directory)
        os.replace(self._tmp_bin, self.bin_path)
        fsync_directory(directory)
        if before_index is not None:
            before_index()
        os.replace(self._tmp_idx, self.idx_path)
        fsync_directory(directory)
        self._closed = True
        logger.info("wrote %s.{bin,idx}: %d documents, %d tokens", self.prefix, self.document_count, self.token_count)

    def abort(self) -> None:
        """Close and delete the temporary files; the final names are never touched."""
        if self._closed:
            return
        for handle in (self._bin, self._lengths, self._docs):
            try:
                handle.close()
            except OSError:
                pass
        for path in (self._tmp_bin, self._tmp_idx, self._tmp_lengths, self._tmp_docs):
            if os.path.exists(path):
                os.unlink(path)
        self._closed = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _prefix_hint(prefix: str) -> str:
    """What the user probably meant by a prefix with no dataset: the classic mistake is the preprocessing
    ``--output-prefix`` (which writes ``{output_prefix}_{key}_document``), or a file name with its extension."""
    def complete(p):
        return os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx")

    found = sorted(p[: -len(".idx")] for p in glob.glob(glob.escape(prefix) + "_*_document.idx")
                   if complete(p[: -len(".idx")]))
    if found:
        return (f"; but {found[0]}.{{bin,idx}} exists" + (f" (and {len(found) - 1} more {prefix}_*_document)"
                                                           if len(found) > 1 else "")
                + f": tools/preprocess_data.py writes {{output-prefix}}_{{key}}_document, so the dataset prefix is "
                f"{found[0]!r}, not the --output-prefix")
    stem, ext = os.path.splitext(prefix)
    if ext in (".bin", ".idx") and complete(stem):
        return f"; {stem}.{{bin,idx}} exists: the prefix is {stem!r}"
    return ""


class IndexedDatasetReader:
    """Minimal memory-mapped reader (no torch import) for merge, inspect, training's start-up check
    and tests.

    Opening a dataset validates it (cheaply: no pass over the ``.bin``), so that a damaged or
    mismatched pair is refused with the file and the reason instead of being copied, reported as
    healthy or failing mid-training: the ``.idx`` header must be readable with a known dtype code,
    the ``.idx`` length must be exactly what its header announces, its document boundaries must span
    its sequences, and the ``.bin`` must hold exactly the tokens the index lists. Raises
    :class:`IndexedDatasetError`.

    Training should use megatron-core's ``IndexedDataset``; this class exists so that the data tools
    stay fast to start and do not depend on torch.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.idx_path = prefix + ".idx"
        self.bin_path = prefix + ".bin"
        missing = [p for p in (self.bin_path, self.idx_path) if not os.path.isfile(p)]
        if missing:
            raise IndexedDatasetError(f"no indexed dataset at {prefix!r}: {' and '.join(missing)} missing "
                                      "(give the prefix, without .bin/.idx)" + _prefix_hint(prefix))
        idx_size = os.path.getsize(self.idx_path)
        with open(self.idx_path, "rb") as handle:
            header = handle.read(_HEADER_BYTES)
        if len(header) < _HEADER_BYTES or header[:9] != _MAGIC:
            raise IndexedDatasetError(f"{self.idx_path}: not a Megatron indexed dataset index (no MMIDIDX header)")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != _VERSION:
            raise IndexedDatasetError(f"{self.idx_path}: unsupported index version {version}")
        if header[17] not in _CODE_TO_DTYPE:
            raise IndexedDatasetError(f"{self.idx_path}: unknown dtype code {header[17]} "
                                      f"(known: {', '.join(f'{c}={d}' for c, d in sorted(_CODE_TO_DTYPE.items()))})")
        self.dtype = np.dtype(_CODE_TO_DTYPE[header[17]])
        (self.sequence_count,) = struct.unpack("<Q", header[18:26])
        (doc_idx_len,) = struct.unpack("<Q", header[26:34])
        n = self.sequence_count
        expected = _HEADER_BYTES + 12 * n + 8 * doc_idx_len  # lengths (int32), pointers and boundaries (int64)
        if idx_size != expected or doc_idx_len < 1:
            raise IndexedDatasetError(
                f"{self.idx_path}: {idx_size} bytes, but its header ({n} sequences, {doc_idx_len} document "
                f"boundaries) needs {expected}" + (" (truncated)" if idx_size < expected else ""))
        self.document_count = doc_idx_len - 1
        self._idx = np.memmap(self.idx_path, mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(self._idx, dtype=np.int32, count=n, offset=_HEADER_BYTES)
        self.sequence_pointers = np.frombuffer(self._idx, dtype=np.int64, count=n, offset=_HEADER_BYTES + 4 * n)
        self.document_indices = np.frombuffer(self._idx, dtype=np.int64, count=doc_idx_len,
                                              offset=_HEADER_BYTES + 12 * n)
        if self.document_indices[0] != 0 or self.document_indices[-1] != n:
            raise IndexedDatasetError(
                f"{self.idx_path}: its document boundaries run from {self.document_indices[0]} to "
                f"{self.document_indices[-1]}, not over its {n} sequences")
        self.token_count = int(self.sequence_lengths.sum(dtype=np.int64))
        itemsize = self.dtype.itemsize
        size = os.path.getsize(self.bin_path)
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize if n else 0
        listed = self.token_count * itemsize
        if size != listed:
            raise IndexedDatasetError(
                f"{self.bin_path}: {size} bytes, but {self.idx_path} lists {self.token_count} {self.dtype} tokens "
                f"= {listed} bytes" + (" (truncated)" if size < listed else "")
                + "; the .bin and .idx do not belong together (re-create or re-copy the dataset)")
        if end != size:
            raise IndexedDatasetError(f"{self.idx_path}: its last sequence ends at byte {end} of {self.bin_path}, "
                                      f"which has {size} (damaged sequence pointers)")
        self._bin = np.memmap(self.bin_path, mode="r", dtype=self.dtype) if size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return self.sequence_count

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return np.asarray(self._bin[start : start + int(self.sequence_lengths[i])])

    def close(self) -> None:
        self._idx = self._bin = None
        self.sequence_lengths = self.sequence_pointers = self.document_indices = None


def read_sidecar(prefix: str) -> Optional[dict]:
    """``{prefix}.json`` (written by preprocess and merge: counts, inputs, tokenizer identity), or
    None when there is none; an unreadable one is logged and treated as absent."""
    path = prefix + ".json"
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            sidecar = json.load(handle)
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable sidecar %s: %s", path, exc)
        return None
    if not isinstance(sidecar, dict):
        logger.warning("ignoring sidecar %s: not a JSON object", path)
        return None
    return sidecar


def index_fingerprint(prefix: str) -> str:
    """sha1 of ``{prefix}.idx``: every sequence length and document boundary of the dataset.

    GPTDataset's cached document/sample/shuffle indices are a function of exactly these (plus the
    split, seed and sequence length already in megatron-core's cache key), so this digest is what
    tells a rewritten dataset from the one the cache was built for. Reading the ``.idx`` costs about
    20 bytes per document (a second for 50M documents) and never touches the ``.bin``; the result is
    memoized per file size and modification time.
    """
    path = prefix + ".idx"
    stat = os.stat(path)
    return _file_sha1(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _file_sha1(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha1(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def max_token_id(prefix: str, dtype: np.dtype) -> Optional[int]:
    """The largest token id in ``{prefix}.bin``, whose tokens are ``dtype`` (:attr:`IndexedDatasetReader.dtype`,
    read from the checked ``.idx``); None when it holds no tokens.

    For a dataset whose tokenizer is not recorded, this is the only way to know that the model's
    embedding can hold its ids: one read of the ``.bin`` in chunks over a memmap (numpy, several GB/s
    from the page cache), with an INFO line for files over 1 GiB and every ~30 s while it runs. The
    result is memoized per file size and modification time (the dry run and the run's start-up in one
    process read the file once).
    """
    path = prefix + ".bin"
    stat = os.stat(path)
    return _bin_max(path, np.dtype(dtype).str, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _bin_max(path: str, dtype: str, size: int, mtime_ns: int) -> Optional[int]:
    import time

    if size == 0:
        return None
    data = np.memmap(path, mode="r", dtype=np.dtype(dtype))
    chunk = 64 << 20  # elements
    big = size > (1 << 30)
    if big:
        logger.info("%s: scanning %.1f GiB for its largest token id (no tokenizer recorded)", path, size / (1 << 30))
    start = last_log = time.monotonic()
    largest = None
    for begin in range(0, len(data), chunk):
        value = int(data[begin : begin + chunk].max())
        largest = value if largest is None else max(largest, value)
        now = time.monotonic()
        if now - last_log >= 30:
            last_log = now
            logger.info("%s: scanned %.0f%% for its largest token id (%.0f s)", path,
                        100 * min(begin + chunk, len(data)) / len(data), now - start)
    if big:
        logger.info("%s: largest token id %d (scanned in %.0f s)", path, largest, time.monotonic() - start)
    del data
    return largest


def _describe_tokenizer(tokenizer) -> str:
    if not isinstance(tokenizer, dict):
        return "no single tokenizer (itself a merge of different tokenizers)"
    sha = str(tokenizer.get("sha256") or "")[:12]
    return (f"the tokenizer {tokenizer.get('path')!r} (vocab_size {tokenizer.get('vocab_size')}, eod_id "
            f"{tokenizer.get('eod_id')}" + (f", sha256 {sha}..." if sha else "") + ")")


def merge_datasets(prefixes: list[str], output_prefix: str, allow_mixed_tokenizers: bool = False) -> dict:
    """Concatenate datasets (documents kept in order) into ``output_prefix.{bin,idx}``.

    Like Megatron-LM's ``tools/merge_datasets.py`` but streamed and published atomically.
    Datasets whose sidecars record different tokenizers are refused (:class:`IndexedDatasetError`,
    nothing written): their ids stand for different pieces, so the merge is almost always a mistake,
    and its sidecar could record no tokenizer for training to check. ``allow_mixed_tokenizers``
    merges them anyway, with ``"tokenizer": null`` in the sidecar. Returns counts of the merged dataset.
    """
    if not prefixes:
        raise ValueError("nothing to merge")
    readers = [IndexedDatasetReader(p) for p in prefixes]  # validate everything before writing
    dtypes = {r.dtype for r in readers}
    if len(dtypes) != 1:
        raise ValueError(f"cannot merge datasets with different dtypes: {sorted(str(d) for d in dtypes)}")
    dtype = readers[0].dtype
    for reader in readers:
        reader.close()
    sidecars = [read_sidecar(p) for p in prefixes]
    tokenizers = {json.dumps(s.get("tokenizer"), sort_keys=True) for s in sidecars if s}
    if len(tokenizers) > 1:
        recorded = [(p, s.get("tokenizer")) for p, s in zip(prefixes, sidecars) if s]
        first = recorded[0]
        other = next(r for r in recorded if json.dumps(r[1], sort_keys=True) != json.dumps(first[1], sort_keys=True))
        what = (f"{first[0]} was made with {_describe_tokenizer(first[1])} and {other[0]} with "
                f"{_describe_tokenizer(other[1])} (per their sidecars)")
        if not allow_mixed_tokenizers:
            raise IndexedDatasetError(f"cannot merge datasets made with different tokenizers: {what}; their ids stand "
                                      "for different pieces. Preprocess them with one tokenizer, or pass "
                                      "--allow-mixed-tokenizers (the merged sidecar then records no tokenizer)")
        logger.warning("merging datasets made with different tokenizers (--allow-mixed-tokenizers): %s; the merged "
                       "sidecar records no tokenizer", what)
    for key, what in (("prepend_bos", "begin with BOS"), ("append_eod", "end with the end-of-document token")):
        flags = {bool(s.get(key, False)) for s in sidecars if s}
        if len(flags) > 1:
            logger.warning("merging datasets whose documents differ in whether they %s (per their sidecars): %s",
                           what, ", ".join(f"{p}: {'yes' if (s or {}).get(key) else 'no'}"
                                           for p, s in zip(prefixes, sidecars) if s))
    unrecorded = [p for p, s in zip(prefixes, sidecars) if not (s and isinstance(s.get("tokenizer"), dict))]
    if unrecorded and len(unrecorded) < len(prefixes):
        logger.warning("%s record(s) no tokenizer (no sidecar, or a merge of several): the merged sidecar records "
                       "none either, and training checks the merged ids against its vocabulary by a scan",
                       ", ".join(unrecorded))
    directory = os.path.dirname(os.path.abspath(output_prefix))
    try:
        os.makedirs(directory, exist_ok=True)
        writer = IndexedDatasetWriter(output_prefix, dtype)
    except OSError as exc:
        raise IndexedDatasetError(f"cannot write the merged dataset {output_prefix!r}: {exc}") from exc
    try:
        for prefix in prefixes:
            writer.add_dataset(prefix)
            logger.info("merged %s", prefix)
        summary = {
            "format": "megatron-core indexed dataset (MMIDIDX v1)",
            "prefix": output_prefix,
            "documents": writer.document_count,
            "sequences": writer.sequence_count,
            "tokens": writer.token_count,
            "dtype": dtype.name,
            "inputs": list(prefixes),
            "merged_from": sidecars,
            "tokenizer": sidecars[0]["tokenizer"] if not unrecorded and len(tokenizers) == 1 else None,
            "created_by": "megatron_apex.data.indexed.merge_datasets",
        }

        def write_sidecar():
            tmp = f"{output_prefix}.json.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(summary, handle, indent=2, sort_keys=True)
            os.replace(tmp, output_prefix + ".json")

        writer.finalize(before_index=write_sidecar)
    except BaseException:
        writer.abort()
        raise
    return {k: summary[k] for k in ("documents", "sequences", "tokens", "dtype", "inputs")}
