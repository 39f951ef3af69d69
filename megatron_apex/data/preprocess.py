"""JSONL corpus -> Megatron ``.bin/.idx`` (one pair per JSON key), streamed and crash-safe.

Pipeline (why it is faster than Megatron-LM's ``tools/preprocess_data.py``, which sends one
document at a time through ``Pool.imap(chunksize=32)`` and builds a torch tensor per document):

1. the main process reads the (possibly compressed) input in blocks of a few MB of whole lines;
2. each block goes to a worker (or is handled in-process with ``workers=1``) which validates every
   line, then tokenizes all texts of the block in *one* batch call (sentencepiece's C++ thread pool
   returning numpy buffers, or Hugging Face's Rust ``encode_batch_fast``) and returns one numpy
   token array plus one lengths array per key -- no per-token Python work anywhere;
3. the main process writes the arrays in block order (deterministic: any worker count gives the
   same bytes) through :class:`~megatron_apex.data.indexed.IndexedDatasetWriter`.

At most ``2 * workers + 2`` blocks are in flight (``Pool.imap`` would read the whole corpus ahead
if tokenization is slower than reading), so memory stays flat whatever the corpus size. Nothing is
published until the whole corpus is done and within ``max_bad_fraction``; see ``indexed.py`` for
the rename order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections import deque
from typing import Optional, Sequence

import numpy as np

from .indexed import IndexedDatasetReader, IndexedDatasetWriter, fsync_directory, optimal_dtype, read_sidecar
from .jsonl import BAD_REASONS, InputError, expand_inputs, field_text, iter_blocks, parse_line
from .tokenizers import Tokenizer, TokenizerError, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "preprocess_jsonl",
    "inspect_dataset",
    "output_prefix_for_key",
    "PreprocessError",
    "TooManyBadLinesError",
    "BAD_REASONS",
]

# Reasons a (line, key) record is skipped: jsonl.BAD_REASONS, all of which count towards
# max_bad_fraction, and "duplicate" (--dedup), which does not.
_MAX_EXAMPLES = 20  # bad lines kept in the sidecar / logged at WARNING level
_MAX_BLOCK_EXAMPLES = 20


class PreprocessError(RuntimeError):
    """A problem with the inputs, the tokenizer or the output location (detected before any work
    starts), or a token id that the dataset dtype cannot hold (nothing is published)."""


class TooManyBadLinesError(RuntimeError):
    """More than ``max_bad_fraction`` of the records were unusable; nothing was published."""


def output_prefix_for_key(output_prefix: str, key: str) -> str:
    """Megatron-LM's naming: ``{prefix}_{key}_document`` (+ ``.bin``/``.idx``/``.json``)."""
    return f"{output_prefix}_{key}_document"


# ---------------------------------------------------------------------------------------------
# Worker side: parse + tokenize one block. Runs in pool processes (state set by _init_worker) or
# in-process when workers == 1.
# ---------------------------------------------------------------------------------------------
_STATE: dict = {}


def _init_worker(config: dict, tokenizer: Optional[Tokenizer] = None) -> None:
    _STATE.clear()
    _STATE.update(config)
    if tokenizer is None:  # in a pool process
        # Ctrl-C is handled by the main process, which terminates the pool; without this every
        # worker would print its own KeyboardInterrupt traceback. SIGTERM (sent by Pool.terminate)
        # must end a worker at once, whatever handler the main process installed before the fork.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        options = {}
        if config["num_threads_one"]:
            # one process per core already: keep the backends single-threaded (no oversubscription)
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            if config["tokenizer_kind"] == "sentencepiece":
                options = {"num_threads": 1}
        try:
            tokenizer = load_tokenizer(config["tokenizer_kind"], config["tokenizer_path"], **options)
        except Exception as exc:  # noqa: BLE001 - an initializer that raises makes Pool respawn forever
            _STATE["error"] = f"worker could not load the tokenizer: {exc}"
    _STATE["tokenizer"] = tokenizer


def _encode_checked(tokenizer: Tokenizer, texts: list, lines: list, reject) -> tuple[list, list]:
    """Batch-encode; if the batch fails, find the culprits one by one. The expected culprits are
    strings with lone surrogates (from ``\\ud800`` escapes: valid JSON, but not encodable as UTF-8);
    any other per-text failure is a real error and propagates."""
    try:
        return tokenizer.encode_batch_arrays(texts), lines
    except Exception:  # noqa: BLE001 - backends raise assorted types; re-checked per text below
        pass
    arrays, kept = [], []
    for text, line in zip(texts, lines):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            reject(line, "invalid_utf8", str(exc)[:120])
            continue
        arrays.append(tokenizer.encode_batch_arrays([text])[0])
        kept.append(line)
    return arrays, kept


def _process_block(task: tuple) -> dict:
    """Validate and tokenize the lines of one block. Returns numpy arrays and counts per key."""
    file_index, first_line, data = task
    if _STATE.get("error"):
        raise RuntimeError(_STATE["error"])
    keys = _STATE["json_keys"]
    tokenizer: Tokenizer = _STATE["tokenizer"]
    texts = {k: [] for k in keys}
    lines = {k: [] for k in keys}
    skipped = {k: {} for k in keys}
    examples: list = []
    records = blank = 0

    def reject(line_no, reason, detail, only_key=None):
        for key in keys if only_key is None else (only_key,):
            skipped[key][reason] = skipped[key].get(reason, 0) + 1
        if len(examples) < _MAX_BLOCK_EXAMPLES:
            examples.append((file_index, line_no, only_key, reason, detail))

    split = data.split(b"\n")
    if split and not split[-1]:
        split.pop()
    for offset, raw in enumerate(split):
        line_no = first_line + offset
        if not raw.strip():
            blank += 1
            continue
        records += 1
        record, reason, detail = parse_line(raw)
        if record is None:
            reject(line_no, reason, detail)
            continue
        for key in keys:
            text, reason, detail = field_text(record, key)
            if text is None:
                reject(line_no, reason, detail, key)
            else:
                texts[key].append(text)
                lines[key].append(line_no)

    dtype = np.dtype(_STATE["dtype"])
    eod = np.array([tokenizer.eod_id], dtype=np.int32)
    bos = np.array([tokenizer.bos_id], dtype=np.int32) if tokenizer.bos_id is not None else None
    prepend, append = int(_STATE["prepend_bos"]), int(_STATE["append_eod"])
    out = {}
    for key in keys:
        arrays, kept_lines = _encode_checked(
            tokenizer, texts[key], lines[key], lambda ln, r, d, k=key: reject(ln, r, d, k)
        ) if texts[key] else ([], [])
        kept_texts = texts[key]
        if len(kept_lines) != len(lines[key]):
            kept_set = set(kept_lines)
            kept_texts = [t for t, ln in zip(texts[key], lines[key]) if ln in kept_set]
        if arrays and any(a.size == 0 for a in arrays):  # text that tokenizes to nothing
            keep = [i for i, a in enumerate(arrays) if a.size]
            for i, a in enumerate(arrays):
                if not a.size:
                    reject(kept_lines[i], "empty", f"{key!r} has no tokens", key)
            arrays = [arrays[i] for i in keep]
            kept_lines = [kept_lines[i] for i in keep]
            kept_texts = [kept_texts[i] for i in keep]
        lengths = np.fromiter(map(len, arrays), dtype=np.int32, count=len(arrays))
        if (prepend or append) and arrays:  # every document as [bos] doc [eod]: one list of pieces, concatenated
            per = 1 + prepend + append
            lengths += per - 1
            parts = [None] * (per * len(arrays))
            if prepend:
                parts[0::per] = [bos] * len(arrays)
            parts[prepend::per] = arrays
            if append:
                parts[prepend + 1::per] = [eod] * len(arrays)
            arrays = parts
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        bad = np.flatnonzero((tokens < 0) | (tokens > np.iinfo(dtype).max)) if dtype.itemsize < 4 else ()
        if len(bad):  # never wrap an id into the dtype: that would silently turn it into another token
            doc = int(np.searchsorted(np.cumsum(lengths), bad[0], side="right"))
            return {"error": (kept_lines[doc], f"[{key}] token id {int(tokens[bad[0]])} does not fit the dataset "
                              f"dtype {dtype} (tokenizer vocab_size {tokenizer.vocab_size}); no output was written")}
        tokens = tokens.astype(dtype, copy=False)
        digests = None
        if _STATE["dedup"]:
            digests = b"".join(
                hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in kept_texts
            )
        out[key] = (tokens, lengths, digests)
    return {"keys": out, "skipped": skipped, "examples": examples, "records": records, "blank": blank}


# ---------------------------------------------------------------------------------------------
# Main process
# ---------------------------------------------------------------------------------------------
class _Progress:
    """tqdm bar on a terminal, otherwise an INFO log line every ``log_interval`` documents and at least
    every ``log_seconds`` of wall time (checked as each block completes): a corpus of long documents can
    take many minutes per ``log_interval`` documents, which looked like a hang."""

    def __init__(self, total_bytes: int, log_interval: int, mode: str = "auto", log_seconds: float = 30.0):
        self.start = self.last_log = time.monotonic()
        self.log_interval = max(1, int(log_interval))
        self.log_seconds = log_seconds
        self.next_log = self.log_interval
        self.bar = None
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="preprocess")

    def update(self, docs: int, tokens: int, done_bytes: int, total_bytes: int) -> None:
        now = time.monotonic()
        elapsed = max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.n = done_bytes
            self.bar.set_postfix(docs=docs, tok_s=f"{tokens / elapsed:,.0f}", refresh=False)
            self.bar.refresh()
        elif self.mode == "log" and (docs >= self.next_log or now - self.last_log >= self.log_seconds):
            self.next_log = (docs // self.log_interval + 1) * self.log_interval
            self.last_log = now
            logger.info(
                "processed %d documents, %d tokens (%.0f docs/s, %.0f tokens/s, %.1f MB/s, %.1f%% of input)",
                docs, tokens, docs / elapsed, tokens / elapsed, done_bytes / elapsed / 1e6,
                100.0 * done_bytes / max(total_bytes, 1),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_output_location(output_prefix: str) -> None:
    directory = os.path.dirname(os.path.abspath(output_prefix))
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise PreprocessError(f"output directory {directory!r} is not writable: {exc}") from exc


def _write_json_atomic(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _run_blocks(files, config, tokenizer, workers, block_bytes):
    """Yield (block, result) in input order, processing up to ``2*workers+2`` blocks ahead."""
    blocks = iter_blocks(files, block_bytes)
    if workers <= 1:
        _init_worker(config, tokenizer)
        for block in blocks:
            yield block, _process_block((block.file_index, block.first_line, block.data))
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(dict(config, num_threads_one=True),))
    pending: deque = deque()
    procs = _workers(pool)
    try:
        for block in blocks:
            task = (block.file_index, block.first_line, block.data)
            block.data = b""  # the worker has its own copy; keep the main process small
            pending.append((block, pool.apply_async(_process_block, (task,))))
            if len(pending) >= 2 * workers + 2:
                done, result = pending.popleft()
                yield done, _result(pool, result, procs)
        while pending:
            done, result = pending.popleft()
            yield done, _result(pool, result, procs)
        pool.close()
        pool.join()
    finally:
        pool.terminate()


def _workers(pool) -> dict:
    """The pool's worker processes by pid (``multiprocessing.Pool`` keeps them in ``_pool``)."""
    return {proc.pid: proc for proc in list(getattr(pool, "_pool", ()))}


def _result(pool, result, procs: dict, poll_s: float = 0.5):
    """``result.get()``, unless a worker process dies first: the pool replaces a dead worker but
    loses the block it held, so waiting on would hang for ever (a worker killed by the kernel's
    out-of-memory killer, say). ``procs`` is :func:`_workers` taken when the pool started; a worker
    that is not among them is a replacement (the pool replaces workers only when one dies).
    Raises :class:`PreprocessError` naming the dead worker instead."""
    while not result.ready():
        result.wait(poll_s)
        if result.ready():
            break
        replaced = set(_workers(pool)) - set(procs)
        dead = [(pid, proc.exitcode) for pid, proc in procs.items() if proc.exitcode not in (None, 0)]
        if replaced or dead:
            if dead:
                pid, code = dead[0]
                how = (f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
                       else f"exited with code {code}")
                who = f"preprocessing worker process {pid} {how}"
            else:
                who = "a preprocessing worker process died"
            raise PreprocessError(f"{who} (out of memory? see the kernel log); its block was lost, so no "
                                  "output was published")
    return result.get()


def preprocess_jsonl(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_kind: Optional[str],
    tokenizer_path: str,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    dedup: bool = False,
    max_bad_fraction: float = 0.01,
    log_interval: int = 100000,
    progress: str = "auto",
    block_bytes: int = 4 << 20,
    prepend_bos: bool = False,
) -> dict:
    """Tokenize JSONL ``inputs`` into ``{output_prefix}_{key}_document.{bin,idx,json}`` per key.

    ``inputs``: files (plain, ``.gz``, ``.zst``, ``.bz2``, ``.xz``) and/or directories of them. ``dedup`` drops exact
    duplicate documents per key (keeps a 16-byte hash per unique document in memory, hence off by
    default). ``prepend_bos`` starts every document with the tokenizer's beginning-of-document token (as
    Llama-3 was trained; a tokenizer without one is refused), ``append_eod`` ends it with the
    end-of-document token. ``progress``: "auto" (bar on a terminal, log lines otherwise), "bar", "log", "none".

    Raises :class:`PreprocessError` before any work for missing inputs, an unloadable tokenizer or
    an unwritable output location, and later (publishing nothing) for a corrupt or truncated
    compressed input or a token id the dataset dtype cannot hold; :class:`TooManyBadLinesError`
    (publishing nothing) when the share of skipped records of some key exceeds
    ``max_bad_fraction``. Returns ``{key: sidecar_dict}``.
    """
    json_keys = list(json_keys)
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise PreprocessError(f"json_keys must be non-empty and unique, got {json_keys}")
    try:
        files = expand_inputs(inputs)
    except InputError as exc:
        raise PreprocessError(str(exc)) from exc
    try:
        tokenizer = load_tokenizer(tokenizer_kind, tokenizer_path)
    except TokenizerError as exc:
        raise PreprocessError(str(exc)) from exc
    if prepend_bos and tokenizer.bos_id is None:
        raise PreprocessError(f"prepend_bos (--prepend-bos): the tokenizer {tokenizer.path} has no "
                              "beginning-of-document token (Qwen2's convention: documents start without one); drop "
                              "--prepend-bos")
    _check_output_location(output_prefix)
    identity = tokenizer.identity()
    dtype = optimal_dtype(tokenizer.vocab_size)
    sizes = [os.path.getsize(p) for p in files]
    total_bytes = sum(sizes)
    config = {
        "json_keys": json_keys, "append_eod": bool(append_eod), "prepend_bos": bool(prepend_bos),
        "dedup": bool(dedup), "dtype": dtype.str,
        "tokenizer_kind": tokenizer.kind, "tokenizer_path": tokenizer.path, "num_threads_one": False,
    }
    logger.info(
        "preprocessing %d file(s), %.1f MB, keys=%s, tokenizer=%s (vocab %d, dtype %s), workers=%d",
        len(files), total_bytes / 1e6, json_keys, tokenizer.path, tokenizer.vocab_size, dtype, workers,
    )
    writers = {}
    try:
        for key in json_keys:
            writers[key] = IndexedDatasetWriter(output_prefix_for_key(output_prefix, key), dtype)
    except BaseException as exc:
        for writer in writers.values():
            writer.abort()
        if isinstance(exc, OSError):
            raise PreprocessError(f"cannot create the outputs of {output_prefix!r}: {exc}") from exc
        raise
    skipped = {k: dict.fromkeys(BAD_REASONS + ("duplicate",), 0) for k in json_keys}
    examples: list = []
    seen = {k: set() for k in json_keys} if dedup else None
    records = blank = 0
    start = time.monotonic()
    bar = _Progress(total_bytes, log_interval, progress)
    results = _run_blocks(files, config, tokenizer, workers, block_bytes)
    try:
        for block, result in results:
            if "error" in result:
                line_no, message = result["error"]
                raise PreprocessError(f"{files[block.file_index]}:{line_no}: {message}")
            records += result["records"]
            blank += result["blank"]
            for file_index, line_no, key, reason, detail in result["examples"]:
                if len(examples) < _MAX_EXAMPLES:
                    where = f"{files[file_index]}:{line_no}"
                    examples.append({"where": where, "key": key, "reason": reason, "detail": detail})
                    logger.warning("skipped %s%s: %s (%s)", where, f" [{key}]" if key else "", reason, detail)
            for key in json_keys:
                for reason, count in result["skipped"][key].items():
                    skipped[key][reason] += count
                tokens, lengths, digests = result["keys"][key]
                if dedup and len(lengths):
                    keep = np.ones(len(lengths), dtype=bool)
                    for i in range(len(lengths)):
                        digest = digests[16 * i : 16 * i + 16]
                        if digest in seen[key]:
                            keep[i] = False
                        else:
                            seen[key].add(digest)
                    if not keep.all():
                        skipped[key]["duplicate"] += int((~keep).sum())
                        tokens = tokens[np.repeat(keep, lengths)]
                        lengths = lengths[keep]
                writers[key].add_documents(tokens, lengths)
            first = writers[json_keys[0]]
            done = sum(sizes[: block.file_index]) + block.raw_end
            bar.update(first.document_count, first.token_count, done, total_bytes)
        bar.close()
        elapsed = time.monotonic() - start
        sidecars = {}
        worst = (0.0, None)
        for key in json_keys:
            bad = sum(skipped[key][r] for r in BAD_REASONS)
            fraction = bad / records if records else 1.0
            worst = max(worst, (fraction, key), key=lambda x: x[0])
            sidecars[key] = {
                "format": "megatron-core indexed dataset (MMIDIDX v1)",
                "prefix": writers[key].prefix,
                "json_key": key,
                "dtype": dtype.name,
                "documents": writers[key].document_count,
                "tokens": writers[key].token_count,
                "lines": records + blank,
                "records": records,
                "blank_lines": blank,
                "skipped": {r: c for r, c in skipped[key].items() if c},
                "skipped_total": sum(skipped[key].values()),
                "bad_fraction": round(fraction, 6),
                "bad_examples": [e for e in examples if e["key"] in (None, key)][:_MAX_EXAMPLES],
                "append_eod": bool(append_eod),
                "prepend_bos": bool(prepend_bos),
                "dedup": bool(dedup),
                "inputs": [{"path": os.path.abspath(p), "bytes": s} for p, s in zip(files, sizes)],
                "tokenizer": identity,
                "elapsed_s": round(elapsed, 3),
                "created_by": "megatron_apex.data.preprocess",
            }
        if records == 0:
            raise TooManyBadLinesError("the input holds no JSON records; no output was written")
        empty = [key for key in json_keys if writers[key].document_count == 0]
        if empty:
            raise TooManyBadLinesError(
                f"no usable document for key(s) {empty} in {records} records (skipped by reason: "
                f"{ {r: c for r, c in skipped[empty[0]].items() if c} }); an empty dataset cannot be "
                "read by megatron-core, so no output was written"
            )
        if worst[0] > max_bad_fraction:
            reasons = {r: c for r, c in skipped[worst[1]].items() if c}
            raise TooManyBadLinesError(
                f"{worst[0]:.1%} of the {records} records were unusable for key {worst[1]!r} "
                f"(limit --max-bad-fraction={max_bad_fraction}); skipped by reason: {reasons}; "
                "no output was written"
            )
        for key in json_keys:
            sidecar_path = writers[key].prefix + ".json"
            writers[key].finalize(before_index=lambda p=sidecar_path, s=sidecars[key]: _write_json_atomic(p, s))
        fsync_directory(os.path.dirname(os.path.abspath(output_prefix)))
        first = sidecars[json_keys[0]]
        logger.info(
            "done: %d documents, %d tokens in %.1fs (%.0f tokens/s); skipped %s",
            first["documents"], first["tokens"], elapsed, first["tokens"] / max(elapsed, 1e-9), first["skipped"],
        )
        return sidecars
    except BaseException as exc:
        bar.close()
        results.close()  # stops the worker pool
        for writer in writers.values():
            writer.abort()
        if isinstance(exc, InputError):  # an input that cannot be decompressed to the end
            raise PreprocessError(str(exc)) from exc
        raise


def document_delimiters(sidecar: dict) -> str:
    """How a dataset's documents are delimited, from its sidecar (a merge's: from its inputs'):
    ``start with BOS: yes|no|mixed|unknown; end with EOD: ...`` (unknown for an input without a sidecar)."""
    sources = sidecar.get("merged_from") or [sidecar]
    parts = []
    for key, what in (("prepend_bos", "start with BOS"), ("append_eod", "end with EOD")):
        # sidecars written before --prepend-bos existed hold documents without one
        values = {None if not source else bool(source.get(key, False)) for source in sources}
        answer = ("unknown" if None in values else "mixed" if len(values) > 1
                  else "yes" if values == {True} else "no")
        parts.append(f"{what}: {answer}")
    return "; ".join(parts)


def inspect_dataset(prefix: str, tokenizer: Optional[Tokenizer] = None, num_samples: int = 3,
                    max_chars: int = 300) -> dict:
    """Counts of an existing dataset and the decoded start of its first ``num_samples`` documents.

    Without a ``tokenizer`` the one recorded in the sidecar (``{prefix}.json``) is used if it still
    exists; otherwise raw ids are shown.
    """
    reader = IndexedDatasetReader(prefix)
    sidecar = read_sidecar(prefix)
    recorded = (sidecar or {}).get("tokenizer") or {}  # None after merging datasets of different tokenizers
    if tokenizer is None and os.path.exists(recorded.get("path") or ""):
        try:
            tokenizer = load_tokenizer(recorded.get("kind"), recorded["path"])
        except TokenizerError as exc:
            logger.warning("cannot load the sidecar's tokenizer: %s", exc)
    lengths = reader.sequence_lengths
    info = {
        "prefix": prefix,
        "dtype": reader.dtype.name,
        "documents": reader.document_count,
        "sequences": reader.sequence_count,
        "tokens": reader.token_count,
        "min_length": int(lengths.min()) if len(lengths) else 0,
        "max_length": int(lengths.max()) if len(lengths) else 0,
        "mean_length": float(lengths.mean()) if len(lengths) else 0.0,
        "sidecar": sidecar,
        "samples": [],
    }
    for i in range(min(num_samples, reader.sequence_count)):
        ids = reader[i]
        sample = {"index": i, "length": int(ids.size), "ids": ids[:16].tolist()}
        if tokenizer is not None:
            sample["text"] = tokenizer.decode(ids.tolist())[:max_chars]
        info["samples"].append(sample)
    reader.close()
    return info
