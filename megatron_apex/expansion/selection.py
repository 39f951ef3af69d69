"""APEX selection of advantageous (P), disadvantageous (N) and extra-tuned (E) units.

At a stage boundary the k units with the highest accumulated score become P and the k lowest become N
(docs/method.md, "Selection and budget"). Every rank and every parallel layout must select the same units, so the
ranking is a *total* order, documented once here and used by every function of this module:

    unit u ranks above unit v  iff  (votes[u], raw[u], -u) > (votes[v], raw[v], -v)   (lexicographic)

i.e. more votes first, then larger accumulated raw statistic, then the *lower* unit index. P is the top k
of this order (votes desc, raw desc, index asc) and N the bottom k (votes asc, raw asc, index desc), so
P and N are disjoint whenever 2k <= number of eligible units. (Note: :func:`rank_votes` breaks exact
ties inside one micro-batch the other way round, lower index = smaller; both are arbitrary but fixed.)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_apex.expansion.geometry import stage_k, unit_share

__all__ = ["rank_units", "select_units", "select_units_partial", "progressive_k", "k_from_ratio"]


def k_from_ratio(ratio: float, n_units: int) -> int:
    """k = floor(ratio * n_units), robust to binary rounding (0.1875 * 32 is exactly 6, not 5)."""
    if not 0.0 <= ratio <= 0.5:
        raise ValueError(f"expansion ratio must lie in [0, 0.5], got {ratio}")
    return unit_share(ratio, n_units)


def rank_units(votes: torch.Tensor, raw: torch.Tensor, exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eligible unit indices ordered best first by the module's total order.

    Args:
        votes: ``[n]`` integer scores.
        raw: ``[n]`` float accumulated raw statistic (tie-break).
        exclude: optional ``[n]`` bool mask of units that may not be selected at all.

    Returns:
        ``[n_eligible]`` int64 indices, best first.
    """
    if votes.dim() != 1 or raw.shape != votes.shape:
        raise ValueError(f"votes and raw must be 1-D of equal shape, got {tuple(votes.shape)}, {tuple(raw.shape)}")
    if raw.is_floating_point() and torch.isnan(raw).any():
        raise ValueError("raw statistics contain NaN; the ranking would be undefined")
    n = votes.shape[0]
    order = torch.arange(n, dtype=torch.int64, device=votes.device)  # [n], index asc
    # Successive stable sorts: least significant key first. Stable descending sorts keep equal keys in
    # their current order, so the final order is (votes desc, raw desc, index asc).
    order = order[torch.sort(raw[order], descending=True, stable=True).indices]
    order = order[torch.sort(votes[order], descending=True, stable=True).indices]
    if exclude is not None:
        if exclude.shape != votes.shape or exclude.dtype != torch.bool:
            raise ValueError("exclude must be a bool mask with the shape of votes")
        order = order[~exclude[order]]
    return order


def select_units(
    votes: torch.Tensor, raw: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Select P (k best) and N (k worst) units; both returned sorted ascending.

    ``exclude`` (progressive mode) removes units from both P and N candidates, e.g. units already used
    as N in an earlier stage. Raises if 2k exceeds the number of eligible units.
    """
    p, n_, _ = select_units_partial(votes, raw, k, 0, exclude)
    return p, n_


def select_units_partial(
    votes: torch.Tensor, raw: torch.Tensor, k: int, e: int, exclude: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Select P, N and E = the next e lowest units after N (partial-training mode).

    Returns ``(P, N, E)``, each an int64 tensor sorted ascending, pairwise disjoint.
    """
    order = rank_units(votes, raw, exclude)  # [n_eligible], best first
    m = order.shape[0]
    if k < 0 or e < 0 or 2 * k + e > m:
        raise ValueError(f"select_units needs k, e >= 0 and 2k + e <= eligible units, got k={k}, e={e}, eligible={m}")
    p = order[:k]
    n_ = order[m - k:]
    e_ = order[m - k - e: m - k]
    return torch.sort(p).values, torch.sort(n_).values, torch.sort(e_).values


def progressive_k(k0: int, stage: int, progressive: bool = True, num_parts: int = 1) -> int:
    """Budget of stage ``stage`` (0-based): halved every stage in progressive mode, rounded down to a
    multiple of ``num_parts`` (the operator's partitions, which divide ``k0``) and never below it
    (:func:`megatron_apex.expansion.geometry.stage_k`)."""
    if stage < 0 or k0 < 0 or num_parts < 1:
        raise ValueError(f"progressive_k needs k0 >= 0, stage >= 0 and num_parts >= 1, got k0={k0}, stage={stage}, "
                         f"num_parts={num_parts}")
    return stage_k(k0, stage, progressive, num_parts)
