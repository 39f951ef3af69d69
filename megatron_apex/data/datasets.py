"""Training data: megatron-core GPTDataset blends and a resumable, layout-independent sample order.

The sample order is a pure function of the *global* sample index: megatron-core's GPTDataset
shuffles documents and samples with the configured seed, and :class:`GlobalBatchSampler` hands
step ``t`` the global indices ``[t*G, (t+1)*G)`` (G = global batch size), each data-parallel rank
taking its contiguous share of every micro-batch slot. Resuming at ``consumed_samples`` or changing
the data-parallel size therefore keeps the data position: every optimizer step sees the same
samples whatever the layout.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from megatron_apex.config import Config, ConfigError

logger = logging.getLogger(__name__)


@dataclass
class _TokenInfo:
    """What megatron-core's GPTDataset needs to know of the tokenizer."""

    vocab_size: int
    eod: int
    pad: int = -1

    @property
    def unique_identifiers(self) -> dict:  # part of the dataset cache description
        return {"vocab_size": self.vocab_size, "eod": self.eod}


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


def _blend(paths: list) -> tuple:
    from megatron.core.datasets.utils import get_blend_from_list

    prefixes = [str(p) for p in paths]
    for p in prefixes[1::2] if len(prefixes) % 2 == 0 and _is_number(prefixes[0]) else prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(p + ext):
                raise ConfigError(f"data.data_path: {p}{ext} does not exist (give prefixes without .bin/.idx)")
    return get_blend_from_list(prefixes)


def _is_number(x: str) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False


def build_datasets(cfg: Config, vocab_size: int, eod_id: int, train_samples: int, valid_samples: int,
                   is_built_on_rank=lambda: True):
    """(train, valid) datasets of at least the requested sizes (valid may be None)."""
    d = cfg.data
    if d.mock:
        train = RandomTokensDataset(train_samples, d.seq_length, vocab_size, cfg.train.seed)
        valid = RandomTokensDataset(max(valid_samples, 1), d.seq_length, vocab_size, cfg.train.seed + 1)
        return train, (valid if valid_samples else None)

    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    blend = _blend(d.data_path)
    kwargs = dict(blend=blend, split=d.split)
    if d.valid_data_path:
        kwargs = dict(blend_per_split=[blend, _blend(d.valid_data_path), None])
    ds_config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=d.seq_length,
        tokenizer=_TokenInfo(vocab_size=vocab_size, eod=eod_id),
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=False,
        eod_mask_loss=d.eod_mask_loss,
        create_attention_mask=False,  # causal attention needs no mask tensor
        path_to_cache=d.data_cache_path,
        mmap_bin_files=True,
        **kwargs,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples or None, None], is_built_on_rank, ds_config).build()
    if valid_samples == 0:
        valid = None
    return train, valid


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


def build_loader(dataset, cfg: Config, consumed_samples: int, total_samples: int, dp_rank: int, dp_size: int):
    """A DataLoader over this rank's micro-batches, starting after ``consumed_samples``."""
    if dataset is None:
        return None
    sampler = GlobalBatchSampler(total_samples, consumed_samples, cfg.train.micro_batch_size, dp_rank, dp_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=cfg.data.num_workers > 0)


def resolve_vocab(cfg: Config) -> tuple[int, int]:
    """(vocab_size, eod_id) from the tokenizer, or from the config when there is none."""
    d = cfg.data
    if cfg.model.vocab_size is not None and (d.tokenizer_type == "none" or d.tokenizer_model is None):
        eod = d.eod_id if d.eod_id is not None else 0
        return cfg.model.vocab_size, eod
    from megatron_apex.data.tokenizers import load_tokenizer

    if not d.tokenizer_model:
        raise ConfigError("data.tokenizer_model is not set (or give model.vocab_size and data.eod_id)")
    if not os.path.exists(d.tokenizer_model):
        raise ConfigError(f"data.tokenizer_model={d.tokenizer_model!r}: no such file")
    tok = load_tokenizer(d.tokenizer_type, d.tokenizer_model)
    vocab = cfg.model.vocab_size or tok.vocab_size
    if vocab < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tok.vocab_size}")
    return vocab, tok.eod_id


def summarize_blend(cfg: Config) -> Optional[str]:
    """One line naming the blend, for the start-up log."""
    if cfg.data.mock:
        return "mock random tokens"
    return " + ".join(map(str, cfg.data.data_path))


__all__ = ["build_datasets", "build_loader", "GlobalBatchSampler", "RandomTokensDataset", "resolve_vocab"]
