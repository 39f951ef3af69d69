"""Partitions of a layer's units and the balancing permutation that lets expansion cross TP ranks.

Why: P and N are chosen globally per layer, but under tensor parallelism each rank holds a contiguous
slice of units. Rather than exchanging rows of W[P] between ranks at every step, we permute the units
of the layer once per stage (docs/method.md, "At scale"; a function-preserving
reordering of FFN channels / query groups with all their rows and columns) so that each of B contiguous
*partitions* holds exactly k_per P units and k_per N units. The operator M is block-diagonal over
partitions, so every block lives on one rank, and B does not depend on the TP degree t, so TP=1
computes exactly the same function. When t divides B every rank holds B/t blocks; with fewer blocks
than ranks (B = 1 is the paper's operator) a block's P and N units are packed at its partition's start,
which lies on one rank, and the ranks without a block do no operator work
(:func:`megatron_apex.expansion.geometry.block_ranks` checks that every block fits).

Conventions: ``perm[new_pos] = old_unit`` ("gather" form: new = old[perm]). Positions are global unit
positions within a layer; :func:`shard_positions` turns them into rank-local ones.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from megatron_apex.expansion.geometry import block_count

__all__ = [
    "num_partitions",
    "round_k_to_partitions",
    "balance_permutation",
    "pack_partitions",
    "packed_positions",
    "invert_permutation",
    "permute_units",
    "permute_fc1",
    "permute_layer_weights",
    "local_blocks",
    "shard_positions",
]


def num_partitions(n_units: int, b_cfg: int = 8, k: int = 0) -> int:
    """B = gcd(b_cfg, n_units, k) (:func:`geometry.block_count`): every partition holds k/B
    P and k/B N units."""
    return block_count(n_units, b_cfg, k)


def round_k_to_partitions(k: int, num_parts: int) -> Tuple[int, int]:
    """Round k down to a multiple of B; returns (k_rounded, k_per). k_per == 0 means no expansion."""
    k_per = k // num_parts
    return k_per * num_parts, k_per


def _check_perm(perm: torch.Tensor, n: Optional[int] = None) -> None:
    if perm.dim() != 1 or perm.dtype != torch.int64:
        raise ValueError("perm must be a 1-D int64 tensor")
    if n is not None and perm.shape[0] != n:
        raise ValueError(f"perm has {perm.shape[0]} entries, expected {n}")


def balance_permutation(
    p_units: torch.Tensor, n_units_sel: torch.Tensor, n_units: int, num_parts: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Permutation giving every partition exactly k_per P and k_per N units, moving as few units as possible.

    Args:
        p_units, n_units_sel: ``[k]`` global indices of the P and N units (disjoint), k = B * k_per.
        n_units: number of units in the layer (n), divisible by B.
        num_parts: B.

    Returns:
        ``perm`` ``[n]`` (perm[new_pos] = old_unit), ``p_pos`` and ``n_pos`` ``[B, k_per]``: the new global
        positions of the P and N units of each partition, ascending. Pairing within a partition is by
        ascending position (the i-th P position feeds the i-th N position).

    Algorithm (deterministic greedy, minimal): in each partition, of each class (P, N, neutral) the units
    with the lowest positions up to the class quota stay where they are; the rest are surplus and must
    move, which is a lower bound on the number of moved units. Surplus units, queued per class in
    ascending index, fill the vacated positions of partitions short of that class, partitions in
    ascending order, classes in the order P, N, neutral, each partition's vacated positions in ascending
    order. When a partition is already balanced nothing of it moves, so a balanced selection gives the
    identity.
    """
    if n_units % num_parts != 0:
        raise ValueError(f"n_units={n_units} is not divisible by num_partitions={num_parts}")
    k = int(p_units.numel())
    if int(n_units_sel.numel()) != k or k % num_parts != 0:
        raise ValueError(f"P and N must both hold B*k_per units (B={num_parts}), got {k} and {n_units_sel.numel()}")
    k_per = k // num_parts
    size = n_units // num_parts
    if 2 * k_per > size:
        raise ValueError(f"2*k_per={2 * k_per} exceeds the partition size {size}")
    cls = torch.zeros(n_units, dtype=torch.int64)  # [n] 0 neutral, 1 P, 2 N
    p_cpu, n_cpu = p_units.detach().cpu().long(), n_units_sel.detach().cpu().long()
    if k and (p_cpu.min() < 0 or n_cpu.min() < 0 or p_cpu.max() >= n_units or n_cpu.max() >= n_units):
        raise ValueError("P/N indices out of range")
    cls[p_cpu] = 1
    cls[n_cpu] = 2
    if int((cls == 1).sum()) != k or int((cls == 2).sum()) != k:
        raise ValueError("P and N must be duplicate-free and disjoint")
    quota = {1: k_per, 2: k_per, 0: size - 2 * k_per}
    cls_list = cls.tolist()
    perm = list(range(n_units))
    vacated = [[] for _ in range(num_parts)]  # per partition, positions to refill (ascending)
    deficit = [{c: 0 for c in (1, 2, 0)} for _ in range(num_parts)]
    surplus = {1: [], 2: [], 0: []}  # per class, units to move (ascending index)
    for b in range(num_parts):
        seen = {1: 0, 2: 0, 0: 0}
        for pos in range(b * size, (b + 1) * size):
            c = cls_list[pos]
            seen[c] += 1
            if seen[c] > quota[c]:
                surplus[c].append(pos)
                vacated[b].append(pos)
        for c in (1, 2, 0):
            deficit[b][c] = max(0, quota[c] - seen[c])
    heads = {1: 0, 2: 0, 0: 0}
    for b in range(num_parts):
        incoming = []
        for c in (1, 2, 0):
            take = deficit[b][c]
            incoming.extend(surplus[c][heads[c]: heads[c] + take])
            heads[c] += take
        for pos, unit in zip(vacated[b], incoming):
            perm[pos] = unit
    perm_t = torch.tensor(perm, dtype=torch.int64)  # [n]
    new_cls = cls[perm_t]  # [n] class at each new position
    pos_all = torch.arange(n_units, dtype=torch.int64)
    p_pos = pos_all[new_cls == 1].view(num_parts, k_per)  # ascending, partition-major
    n_pos = pos_all[new_cls == 2].view(num_parts, k_per)
    dev = p_units.device
    return perm_t.to(dev), p_pos.to(dev), n_pos.to(dev)


def pack_partitions(
    perm: torch.Tensor, p_pos: torch.Tensor, n_pos: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Follow ``perm`` by a reordering inside every partition: its P units first, then its N units, then
    the others, each class in its current order.

    The engine applies this after :func:`balance_permutation`, so that the P and N rows of every weight
    are strided blocks (expansion/inplace.py reads and writes them without gathers). Units never leave
    their partition here, so no unit crosses a TP rank beyond what the balancing moved, and the pairing
    (the i-th P position feeds the i-th N position) is kept.

    Args:
        perm: ``[n]`` gather-form permutation (``perm[new_pos] = old_unit``).
        p_pos, n_pos: ``[B, k_per]`` ascending positions of the P and N units after ``perm``.

    Returns:
        (perm, p_pos, n_pos) of the composed permutation; p_pos[b] = b*U + [0, k_per) and
        n_pos[b] = b*U + k_per + [0, k_per) with U = n / B.
    """
    _check_perm(perm)
    n, (num_parts, k_per) = perm.shape[0], p_pos.shape
    size = n // num_parts
    p_cpu, n_cpu = p_pos.detach().cpu().long(), n_pos.detach().cpu().long()
    rest = torch.ones(n, dtype=torch.bool)
    rest[p_cpu.reshape(-1)] = False
    rest[n_cpu.reshape(-1)] = False
    others = torch.arange(n, dtype=torch.int64)[rest].view(num_parts, size - 2 * k_per)  # ascending per partition
    order = torch.cat([p_cpu, n_cpu, others], dim=1).reshape(-1)  # [n]: new position -> position after perm
    return (perm[order.to(perm.device)], *packed_positions(num_parts, k_per, n, perm.device))


def packed_positions(num_parts: int, k_per: int, n_units: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``[B, k_per]`` P and N positions of the packed layout: b*U + [0, k_per) and
    b*U + k_per + [0, k_per), U = n_units / B (``n_units`` may be a rank's local count)."""
    base = torch.arange(num_parts, dtype=torch.int64, device=device).unsqueeze(1) * (n_units // num_parts)
    ar = torch.arange(k_per, dtype=torch.int64, device=device)
    return base + ar, base + k_per + ar


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv such that inv[perm[i]] = i (maps an old unit index to its new position)."""
    _check_perm(perm)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.shape[0], dtype=perm.dtype, device=perm.device)
    return inv


def permute_units(t: torch.Tensor, perm: torch.Tensor, unit_size: int, dim: int) -> torch.Tensor:
    """Reorder the units of ``t`` along ``dim``: new unit i = old unit perm[i].

    ``t.shape[dim] == n * unit_size``; each unit is ``unit_size`` consecutive entries (qkv: (r+2)*d rows
    per group; proj: r*d columns per group; fc2: 1 column per channel). Works for weights, biases and
    optimizer state (exp_avg, exp_avg_sq, fp32 main params) alike.
    """
    n = perm.shape[0]
    if t.shape[dim] != n * unit_size:
        raise ValueError(f"permute_units: size {t.shape[dim]} along dim {dim} != {n} units * {unit_size}")
    idx = (perm.to(t.device).unsqueeze(1) * unit_size
           + torch.arange(unit_size, device=t.device)).reshape(-1)  # [n*unit_size]
    return t.index_select(dim, idx)


def permute_fc1(w: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Permute a global ``[2f, ...]`` = [gate; up] tensor: both halves get the same channel order."""
    f = perm.shape[0]
    if w.shape[0] != 2 * f:
        raise ValueError(f"permute_fc1: expected {2 * f} rows, got {w.shape[0]}")
    return torch.cat([permute_units(w[:f], perm, 1, 0), permute_units(w[f:], perm, 1, 0)], dim=0)  # [2f, h]


def permute_layer_weights(
    weights: Dict[str, torch.Tensor],
    attn_perm: Optional[torch.Tensor],
    ffn_perm: Optional[torch.Tensor],
    num_groups: int,
) -> Dict[str, torch.Tensor]:
    """Apply the unit permutations to one layer's GLOBAL (TP=1 layout) tensors, matched by name suffix.

    Handles ``linear_qkv.weight``/``.bias`` (group units, dim 0), ``linear_proj.weight`` (dim 1),
    ``linear_fc1.weight``/``.bias`` (gate and up halves) and ``linear_fc2.weight`` (dim 1); other
    entries (norms, ``linear_proj.bias``) pass through since they do not index units.
    """
    out = {}
    for name, t in weights.items():
        if attn_perm is not None and (name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias")):
            out[name] = permute_units(t, attn_perm, t.shape[0] // num_groups, 0)
        elif attn_perm is not None and name.endswith("linear_proj.weight"):
            out[name] = permute_units(t, attn_perm, t.shape[1] // num_groups, 1)
        elif ffn_perm is not None and (name.endswith("linear_fc1.weight") or name.endswith("linear_fc1.bias")):
            out[name] = permute_fc1(t, ffn_perm)
        elif ffn_perm is not None and name.endswith("linear_fc2.weight"):
            out[name] = permute_units(t, ffn_perm, 1, 1)
        else:
            out[name] = t
    return out


def local_blocks(p_pos: torch.Tensor, tp_rank: int, tp_size: int, n_units: int) -> Tuple[int, int]:
    """(first, count): the operator blocks (rows of the global ``[B, k_per]`` positions) that lie on rank
    ``tp_rank``. Blocks are in ascending position order, so a rank's blocks are contiguous; with fewer
    blocks than ranks (:func:`megatron_apex.expansion.geometry.block_ranks`) a rank may hold none."""
    if n_units % tp_size or not 0 <= tp_rank < tp_size:
        raise ValueError(f"local_blocks: n={n_units} must be divisible by tp_size={tp_size}, and 0 <= tp_rank="
                         f"{tp_rank} < tp_size")
    owner = (p_pos[:, 0].detach().cpu() // (n_units // tp_size)).tolist() if p_pos.shape[1] else []
    mine = [b for b, q in enumerate(owner) if q == tp_rank]
    return (mine[0] if mine else sum(1 for q in owner if q < tp_rank)), len(mine)


def shard_positions(
    p_pos: torch.Tensor, n_pos: torch.Tensor, tp_rank: int, tp_size: int, n_units: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Global ``[B, k_per]`` positions -> the rank's local ``[B_local, k_per]`` positions.

    Rank q holds units ``[q*n/t, (q+1)*n/t)`` and the blocks whose units lie there (:func:`local_blocks`):
    B/t of them when t divides B, else one or none.
    """
    first, count = local_blocks(p_pos, tp_rank, tp_size, n_units)
    n_loc = n_units // tp_size
    off = tp_rank * n_loc
    p_loc, n_loc_pos = p_pos[first:first + count] - off, n_pos[first:first + count] - off
    for x in (p_loc, n_loc_pos):
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= n_loc):
            raise ValueError("shard_positions: a partition's units straddle TP ranks (is the permutation applied?)")
    return p_loc, n_loc_pos
