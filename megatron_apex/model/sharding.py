"""Tensor-parallel shards of global tensors, and back (megatron-core's layout)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def tp_gather(t: torch.Tensor, dim: int, tp_group, tp_size: int, swiglu: bool = False) -> torch.Tensor:
    """Local TP shard -> global tensor (``swiglu``: local [gate_i; up_i] -> global [gate; up])."""
    if tp_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(tp_size)]
    dist.all_gather(parts, t.contiguous(), group=tp_group)
    if swiglu:
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=dim)


def tp_shard(full: torch.Tensor, dim: int, tp_rank: int, tp_size: int, swiglu: bool = False) -> torch.Tensor:
    """Global tensor -> this rank's TP shard (inverse of :func:`tp_gather`)."""
    if tp_size == 1:
        return full
    if swiglu:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]
