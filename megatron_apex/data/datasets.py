"""Training data: megatron-core GPTDataset blends and a resumable, layout-independent sample order.

The sample order is a pure function of the *global* sample index: megatron-core's GPTDataset
shuffles documents and samples with the configured seed, and :class:`GlobalBatchSampler` hands
step ``t`` the global indices ``[t*G, (t+1)*G)`` (G = global batch size), each data-parallel rank
taking its contiguous share of every micro-batch slot. Resuming at ``consumed_samples`` or changing
the data-parallel size therefore keeps the data position: every optimizer step sees the same
samples whatever the layout.

:func:`build_datasets` checks every dataset before megatron-core opens it, and raises
:class:`~megatron_apex.config.ConfigError` naming the dataset and the reason: the ``.bin``/``.idx``
pair must be consistent (:class:`~megatron_apex.data.indexed.IndexedDatasetReader`), the tokenizer
its sidecar records must be the configured one (vocabulary size and end-of-document id; another
tokenizer file with the same ones is a warning), a dataset whose tokenizer is not recorded (no
sidecar, or a merge of datasets of different tokenizers) must hold no token id beyond the padded
vocabulary (its ``.bin`` is scanned once: such an id would crash the first step inside the
embedding), and every part of the split that is read must hold documents. Index caches are keyed by each dataset's ``.idx``
contents (:class:`FingerprintedGPTDataset`), so re-preprocessing into the same prefix never reuses
indices built for the old data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset

from megatron_apex.compat import safe_load
from megatron_apex.config import Config, ConfigError, parse_blend
from megatron_apex.data.indexed import (IndexedDatasetError, IndexedDatasetReader, index_fingerprint, max_token_id,
                                        read_sidecar)
from megatron_apex.data.tokenizers import TokenizerError, file_sha256, load_tokenizer

logger = logging.getLogger(__name__)
safe_load.install_index_cache_reader()  # an index cache never unpickles

_SPLITS = ("train", "valid", "test")


@dataclass
class _TokenInfo:
    """What megatron-core's GPTDataset needs to know of the tokenizer."""

    vocab_size: int
    eod: int
    pad: int = -1

    @property
    def unique_identifiers(self) -> dict:  # part of the dataset cache description
        return {"vocab_size": self.vocab_size, "eod": self.eod}


class FingerprintedGPTDataset(GPTDataset):
    """megatron-core's GPTDataset whose index cache key also covers the dataset's contents.

    megatron-core keys the cached document/sample/shuffle indices by the prefix path, the split,
    the seed, the sequence length and the tokenizer, not by the data: after a new corpus is written
    to the same prefix it would reuse the old indices (training silently on a subset, or failing
    mid-run with an IndexError). The indices are a function of the sequence lengths in the ``.idx``,
    so its digest (:func:`~megatron_apex.data.indexed.index_fingerprint`) completes the key.
    """

    def _build_document_sample_shuffle_indices(self):
        if self.dataset_path is not None:
            self.unique_identifiers["index_sha1"] = index_fingerprint(self.dataset_path)
            # recomputed as megatron-core's MegatronDataset.__init__ does
            self.unique_description = json.dumps(self.unique_identifiers, indent=4,
                                                 default=lambda obj: obj.unique_identifiers)
            self.unique_description_hash = hashlib.md5(self.unique_description.encode("utf-8"),
                                                       usedforsecurity=False).hexdigest()
        cache = self._index_cache_to_build()
        if cache is None:
            try:
                return super()._build_document_sample_shuffle_indices()
            except safe_load.UnsafeFileError as exc:  # a cache file that holds pickled objects
                raise ConfigError(str(exc)) from None
        # megatron-core says so at INFO under its own logger, which the run keeps at WARNING; on a large
        # corpus this takes minutes while the other ranks wait in a barrier, so the run says it itself.
        split = self.index_split.name
        logger.info("%s: building the %s sample indices (%d samples of %d tokens; megatron-core GPTDataset), "
                    "cached in %s", self.dataset_path, split, self.num_samples, self.config.sequence_length, cache)
        start = time.monotonic()
        indices = super()._build_document_sample_shuffle_indices()
        logger.info("%s: built the %s sample indices in %.1f s", self.dataset_path, split, time.monotonic() - start)
        return indices

    def _index_cache_to_build(self) -> Optional[str]:
        """The cache directory when this rank builds the indices afresh (megatron-core's own test: no
        complete cached set, and rank 0 or no process group), else None."""
        if self.config.defer_npy_index_mmap or self.config.fast_cache_load or self.config.mock:
            return None
        path = self.config.path_to_cache or os.path.join(self.dataset.path_prefix, "cache",
                                                         f"{type(self).__name__}_indices")
        base = os.path.join(path, f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}")
        if all(os.path.isfile(f"{base}-{affix}") for affix in ("description.txt", "document_index.npy",
                                                                "sample_index.npy", "shuffle_index.npy")):
            return None
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return None
        return path


class RandomTokensDataset(torch.utils.data.Dataset):
    """Seeded random tokens (data.mock): sample i depends only on (seed, i)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.num_samples, self.seq_length, self.vocab_size, self.seed = num_samples, seq_length, vocab_size, seed

    def __len__(self):
        return self.num_samples

    def __getitem__(self, idx):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(idx))
        text = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=g)
        return {"tokens": text[:-1], "labels": text[1:],
                "loss_mask": torch.ones(self.seq_length), "position_ids": torch.arange(self.seq_length)}


class _DatasetChecks:
    """The start-up checks of the datasets of one build (see the module doc)."""

    def __init__(self, cfg: Config, vocab_size: int, eod_id: int):
        self.cfg, self.vocab_size, self.eod_id = cfg, vocab_size, eod_id
        self.tokenizer = configured_tokenizer(cfg)
        self.sequences: dict = {}  # prefix -> sequence (document) count
        self.blends: dict = {}     # field -> megatron-core's (prefixes, weights), checked
        self._sha256 = None

    def blend(self, field: str, paths: list) -> tuple:
        """megatron-core's ``(prefixes, weights)`` of a data_path-style list, every dataset checked."""
        prefixes, weights = parse_blend(field, paths)
        for prefix in prefixes:
            try:
                reader = IndexedDatasetReader(prefix)
            except IndexedDatasetError as exc:
                raise ConfigError(f"{field}: {exc}") from None
            self.sequences[prefix] = reader.sequence_count
            logger.info("%s: %d documents, %d tokens (%s)", prefix, reader.document_count, reader.token_count,
                        reader.dtype)
            dtype = reader.dtype
            reader.close()
            self._check_tokenizer(field, prefix, dtype)
        self.blends[field] = (prefixes, weights)
        return prefixes, weights

    def _check_tokenizer(self, field: str, prefix: str, dtype: np.dtype) -> None:
        sidecar = read_sidecar(prefix)
        recorded = (sidecar or {}).get("tokenizer")
        if not isinstance(recorded, dict):
            self._check_token_ids(field, prefix, dtype, sidecar)
            return
        tok = self.tokenizer
        made = f"{field}: {prefix} was made with the tokenizer {recorded.get('path')!r}"
        vocab, eod = recorded.get("vocab_size"), recorded.get("eod_id")
        if tok is not None and vocab is not None and vocab != tok.vocab_size:
            raise ConfigError(f"{made} (vocab_size {vocab}, per {prefix}.json), but data.tokenizer_model="
                              f"{self.cfg.data.tokenizer_model!r} has vocab_size {tok.vocab_size}; preprocess the "
                              "data with the configured tokenizer, or configure the one it was made with")
        if isinstance(vocab, int) and vocab > self.vocab_size:
            raise ConfigError(f"{made} (vocab_size {vocab}, per {prefix}.json), but model.vocab_size="
                              f"{self.vocab_size} cannot hold its ids")
        if eod is not None and eod != self.eod_id:
            source = "data.tokenizer_model" if tok is not None else "data.eod_id"
            raise ConfigError(f"{made} (eod_id {eod}, per {prefix}.json), but training uses eod_id {self.eod_id} "
                              f"(from {source}); documents would not be separated")
        sha = recorded.get("sha256")
        if tok is not None and sha:
            if self._sha256 is None:
                self._sha256 = file_sha256(tok.path)
            if sha != self._sha256:
                logger.warning("%s: made with the tokenizer %s (sha256 %s...), not with data.tokenizer_model=%s "
                               "(sha256 %s...): same vocabulary size and end-of-document id, but the ids may stand "
                               "for other pieces", prefix, recorded.get("path"), sha[:12], tok.path, self._sha256[:12])

    def _check_token_ids(self, field: str, prefix: str, dtype: np.dtype, sidecar: Optional[dict]) -> None:
        """A dataset whose tokenizer is not recorded: its largest id must fit the padded vocabulary, or the
        first step fails inside the embedding (IndexError on CPU, a device-side assert on GPU) without
        naming the data. The .bin is scanned once (:func:`max_token_id`), unless its dtype cannot hold an
        id that large."""
        if sidecar is None:
            why = f"no sidecar {prefix}.json from tools/preprocess_data.py"
        elif sidecar.get("merged_from") and not all(isinstance((m or {}).get("tokenizer"), dict)
                                                    for m in sidecar["merged_from"]):
            why = (f"its sidecar {prefix}.json records no tokenizer: a merge including datasets without a recorded "
                   "tokenizer")
        elif sidecar.get("merged_from"):
            why = (f"its sidecar {prefix}.json records no single tokenizer: a merge of datasets made with "
                   "different tokenizers")
        else:
            why = f"its sidecar {prefix}.json records no tokenizer"
        padded = self.cfg.padded_vocab_size(self.vocab_size)
        if dtype.kind in "iu" and np.iinfo(dtype).max < padded:
            logger.info("%s: no tokenizer recorded (%s); its %s ids all fit the padded vocabulary of %d",
                        prefix, why, dtype, padded)
            return
        largest = _on_rank0(lambda: max_token_id(prefix, dtype))
        if largest is not None and largest >= padded:
            raise ConfigError(f"{field}: {prefix} holds token id {largest}, but the padded vocabulary has {padded} "
                              f"ids (0..{padded - 1}; model.vocab_size {self.vocab_size}): the data was made with "
                              f"another tokenizer ({why}); preprocess it with the configured tokenizer, or "
                              "configure the one it was made with")
        if largest is not None and largest >= self.vocab_size:
            logger.warning("%s: holds token id %d, beyond the vocabulary of %d (only the padding rows of the "
                           "embedding hold it): made with another tokenizer? (%s)", prefix, largest, self.vocab_size,
                           why)
            return
        logger.info("%s: no tokenizer recorded (%s); its largest token id, %s, fits the vocabulary of %d", prefix,
                    why, largest, self.vocab_size)

    def require_documents(self, field: str, prefixes: list, parts: dict, split: Optional[str] = None) -> None:
        """Refuse a dataset with no documents in a part that is read: megatron-core would loop
        forever looking for its tokens. ``parts``: split name -> (begin, end) fractions of the
        dataset, from data.split when ``split`` is given."""
        for prefix in prefixes:
            n = self.sequences[prefix]
            for name, (begin, end) in parts.items():
                if int(round(end * n)) > int(round(begin * n)):  # megatron-core's rounding
                    continue
                if split is None:
                    raise ConfigError(f"{field}: {prefix} holds no documents")
                raise ConfigError(f"{field}: {prefix} has {n} documents, and data.split={split!r} leaves none of "
                                  f"them for {name}: give {name} a larger share or use more data"
                                  + (", or set data.valid_data_path" if name == "valid" else ""))

    def require_parts(self, valid_samples: int) -> Optional[list]:
        """:meth:`require_documents` for every part a build reading ``valid_samples`` validation samples
        reads. Returns megatron-core's split matrix with the unread parts None (None with
        data.valid_data_path, where data.split is not used)."""
        d = self.cfg.data
        if d.valid_data_path:
            self.require_documents("data.data_path", self.blends["data.data_path"][0], {"train": (0.0, 1.0)})
            if valid_samples:
                self.require_documents("data.valid_data_path", self.blends["data.valid_data_path"][0],
                                       {"valid": (0.0, 1.0)})
            return None
        from megatron.core.datasets.blended_megatron_dataset_config import (
            convert_split_vector_to_split_matrix, parse_and_normalize_split)

        # Only the parts that are read count (train; valid when asked for): an unread part can neither stall
        # megatron-core (no documents) nor cost an index.
        full = convert_split_vector_to_split_matrix(parse_and_normalize_split(d.split))
        matrix = [part if name == "train" or (name == "valid" and valid_samples) else None
                  for name, part in zip(_SPLITS, full)]
        self.require_documents("data.data_path", self.blends["data.data_path"][0],
                               {name: part for name, part in zip(_SPLITS, matrix) if part is not None}, d.split)
        return matrix


def _on_rank0(fn):
    """``fn()`` computed by global rank 0 alone and given to every rank (in a run; in the dry run, here): a
    scan of a large .bin is read once from the shared file system, not once per rank."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box = [fn() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_datasets(cfg: Config, vocab_size: int, eod_id: int,
                   valid_samples: Optional[int] = None) -> Optional[_DatasetChecks]:
    """The start-up checks of :func:`build_datasets` alone (module doc), without building any index: for
    the dry run, and to stop a run on bad data before its model is built. With ``valid_samples`` (the
    validation samples the run reads), also that every part of the split it reads holds documents, as
    :func:`build_datasets` requires. Returns what they found (None with mock data), which
    :func:`build_datasets` takes instead of checking again."""
    d = cfg.data
    if d.mock:
        return None
    checks = _DatasetChecks(cfg, vocab_size, eod_id)
    checks.blend("data.data_path", d.data_path)
    if d.valid_data_path:
        checks.blend("data.valid_data_path", d.valid_data_path)
    if valid_samples is not None:
        checks.require_parts(valid_samples)
    return checks


def build_datasets(cfg: Config, vocab_size: int, eod_id: int, train_samples: int, valid_samples: int,
                   is_built_on_rank=lambda: True, checks: Optional[_DatasetChecks] = None):
    """(train, valid) datasets of at least the requested sizes (valid is None when valid_samples is 0).

    Every dataset is checked first (module doc), unless ``checks`` (from :func:`check_datasets`) did.
    Only the parts that are read are built: the test part of data.split never is, the valid part only
    when ``valid_samples`` > 0. Unused splits get size 0, not None: megatron-core refuses a size of
    None for a weighted blend.
    """
    d = cfg.data
    if d.mock:
        train = RandomTokensDataset(train_samples, d.seq_length, vocab_size, cfg.train.seed)
        valid = RandomTokensDataset(max(valid_samples, 1), d.seq_length, vocab_size, cfg.train.seed + 1)
        return train, (valid if valid_samples else None)

    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    checks = checks or check_datasets(cfg, vocab_size, eod_id)
    blend = checks.blends["data.data_path"]
    if d.valid_data_path:
        valid_blend = checks.blends["data.valid_data_path"]
        kwargs = dict(blend_per_split=[blend, valid_blend if valid_samples else None, None])
    else:
        kwargs = dict(blend=blend, split=d.split)
    ds_config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=d.seq_length,
        tokenizer=_TokenInfo(vocab_size=vocab_size, eod=eod_id),
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=d.eod_mask_loss,
        create_attention_mask=d.reset_attention_mask,  # plain causal attention needs no mask tensor
        path_to_cache=d.data_cache_path,
        mmap_bin_files=True,
        **kwargs,
    )
    matrix = checks.require_parts(valid_samples)
    if matrix is not None:
        # The matrix is part of the cache key: switching validation on or off indexes the train part once
        # more (in the same order).
        ds_config.split_matrix = matrix
    train, valid, _ = BlendedMegatronDatasetBuilder(
        FingerprintedGPTDataset, [train_samples, valid_samples, 0], is_built_on_rank, ds_config).build()
    _log_epochs(train, train_samples, d.seq_length)
    return train, (valid if valid_samples else None)


def build_eval_dataset(prefix: str, seq_length: int, num_samples: int, seed: int, vocab_size: int, eod_id: int,
                       cache_path: Optional[str] = None, reset_attention_mask: bool = False):
    """The first ``num_samples`` samples of ``prefix`` as the trainer's validation reads them from
    ``data.valid_data_path=[prefix]`` with ``train.seed=seed``: megatron-core's GPTDataset of the valid
    split over all of the dataset's documents (same index construction, same order). With a fixed ``seed``
    every model is measured on the same tokens, whatever seed it was trained with. ``num_samples`` 0:
    one pass over the dataset (every sample of one epoch). ``reset_attention_mask``: samples carry the
    document masks of ``data.reset_attention_mask``, built as the trainer's are."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    try:
        reader = IndexedDatasetReader(prefix)
    except IndexedDatasetError as exc:
        raise ConfigError(str(exc)) from None
    tokens, documents = reader.token_count, reader.document_count
    reader.close()
    epoch = (tokens - 1) // seq_length  # samples of seq_length + 1 tokens, overlapping by one
    if documents == 0 or epoch < 1:
        raise ConfigError(f"{prefix}: {tokens} tokens in {documents} documents, fewer than one sample of "
                          f"{seq_length + 1} tokens")
    num_samples = num_samples or epoch
    ds_config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, tokenizer=_TokenInfo(vocab_size=vocab_size, eod=eod_id),
        reset_position_ids=False, reset_attention_mask=reset_attention_mask, eod_mask_loss=False,
        create_attention_mask=reset_attention_mask, path_to_cache=cache_path, mmap_bin_files=True, blend_per_split=[None, ([prefix], None), None])
    _, valid, _ = BlendedMegatronDatasetBuilder(FingerprintedGPTDataset, [0, num_samples, 0], lambda: True,
                                                ds_config).build()
    return valid, num_samples


def _log_epochs(train, train_samples: int, seq_length: int) -> None:
    """Say how many epochs of each training dataset the run reads when that is more than one: megatron-core
    repeats a small corpus silently (each epoch shuffled anew), which looks like a healthy run while the
    model memorizes it."""
    if train is None:
        return
    if hasattr(train, "datasets"):  # a BlendedDataset: dataset i gives about weights[i] of the samples
        parts = list(zip(train.datasets, train.weights))
    else:
        parts = [(train, 1.0)]
    for dataset, weight in parts:
        if not isinstance(dataset, GPTDataset):
            continue
        tokens = int(dataset._get_num_tokens_per_epoch())
        per_epoch = (tokens - dataset.config.add_extra_token_to_sequence) // seq_length
        if per_epoch <= 0:
            continue
        epochs = weight * train_samples / per_epoch
        if epochs > 1:
            logger.info("the run reads %.1f epochs of %s (its training split holds %d samples of %d tokens)",
                        epochs, dataset.dataset_path, per_epoch, seq_length)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of global sample indices for one data-parallel rank, from a start offset.

    Step t covers global indices [t*G, (t+1)*G). Micro-batch slot j of that step holds indices
    [t*G + j*mbs*dp, t*G + (j+1)*mbs*dp), of which rank r takes [r*mbs, (r+1)*mbs).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int):
        self.total, self.consumed = total_samples, consumed_samples
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __len__(self):
        return (self.total - self.consumed) // (self.mbs * self.dp_size)

    def __iter__(self) -> Iterator[list]:
        span = self.mbs * self.dp_size
        for start in range(self.consumed, self.total - span + 1, span):
            first = start + self.dp_rank * self.mbs
            yield list(range(first, first + self.mbs))


def _worker_ignores_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave the stop signals to the trainer. slurm and torchrun send SIGTERM (and
    slurm's --signal USR1) to the whole process group: torch's workers die of a SIGTERM that their parent
    did not send, and the trainer would then fail on its next batch instead of saving and exiting 75.
    Workers still end with the trainer (torch's watchdog ends them when their parent is gone)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def build_loader(dataset, cfg: Config, consumed_samples: int, total_samples: int, dp_rank: int, dp_size: int):
    """A DataLoader over this rank's micro-batches, starting after ``consumed_samples``."""
    if dataset is None:
        return None
    sampler = GlobalBatchSampler(total_samples, consumed_samples, cfg.train.micro_batch_size, dp_rank, dp_size)
    workers = cfg.data.num_workers
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                                       worker_init_fn=_worker_ignores_stop_signals if workers else None)


def configured_tokenizer(cfg: Config):
    """The tokenizer of data.tokenizer_model, or None when there is none (data.tokenizer_type='none').
    Raises :class:`ConfigError` (naming the field and the value) when it cannot be loaded."""
    d = cfg.data
    if d.tokenizer_type == "none" or not d.tokenizer_model:
        return None
    if not os.path.exists(d.tokenizer_model):
        raise ConfigError(f"data.tokenizer_model={d.tokenizer_model!r}: no such file")
    try:
        return load_tokenizer(d.tokenizer_type, d.tokenizer_model)
    except TokenizerError as exc:
        raise ConfigError(f"data.tokenizer_model={d.tokenizer_model!r} (data.tokenizer_type={d.tokenizer_type!r}): "
                          f"{exc}") from None


def resolve_vocab(cfg: Config) -> tuple[int, int]:
    """(vocab_size, eod_id) from the tokenizer, or from the config when there is none."""
    d = cfg.data
    if cfg.model.vocab_size is not None and (d.tokenizer_type == "none" or d.tokenizer_model is None):
        eod = d.eod_id if d.eod_id is not None else 0
        return cfg.model.vocab_size, eod
    tok = configured_tokenizer(cfg)
    if tok is None:
        raise ConfigError("data.tokenizer_model is not set (or give model.vocab_size and data.eod_id)")
    vocab = cfg.model.vocab_size or tok.vocab_size
    if vocab < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tok.vocab_size}")
    return vocab, tok.eod_id


def summarize_blend(cfg: Config) -> Optional[str]:
    """One line naming the blend, for the start-up log."""
    if cfg.data.mock:
        return "mock random tokens"
    return " + ".join(map(str, cfg.data.data_path))


__all__ = ["build_datasets", "build_loader", "configured_tokenizer", "FingerprintedGPTDataset", "GlobalBatchSampler",
           "RandomTokensDataset", "resolve_vocab"]
