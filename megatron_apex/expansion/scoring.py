"""APEX advantage scoring: per-unit activation statistics and rank votes.

The paper scores a unit not by the magnitude of its activations but by how often it ranks among the
top-K (+1) or bottom-K (-1) units of its layer in a micro-batch (docs/method.md, "Units and scores"). The hooks
record squared L2 norms (the ranking needs only their order); :func:`step_scores` turns a step's into
votes and into the sum of the (non-squared) norms, the raw score. ``apex.statistic`` chooses what the
selection ranks by: ``rank`` (votes, ties by the summed norms), ``norm`` (the summed norms alone) or
``ema`` (an exponential moving average over steps of each step's summed norms, :func:`accumulate_scores`).

Everything here is a pure function of tensors. Under tensor parallelism the statistics are computed on
the local shard (``unit_sq_norms_*`` only see local units); the engine gathers them across the TP group
(and sums them across the CP group) before calling :func:`rank_votes`, which needs the whole layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["rank_votes", "step_scores", "accumulate_scores", "unit_sq_norms_ffn", "unit_sq_norms_silu",
           "unit_sq_norms_attn"]

STATISTICS = ("rank", "norm", "ema")


def rank_votes(stats: torch.Tensor, k: int, check_nan: bool = True) -> torch.Tensor:
    """Per row, +1 for the k largest entries and -1 for the k smallest.

    Args:
        stats: ``[L, n]`` statistic per (layer, unit); any real dtype.
        k: number of units voted up and down per row, ``0 <= 2k <= n``.
        check_nan: refuse NaN statistics here (a host synchronisation on a GPU); the engine checks
            its accumulated sums at the boundary instead.

    Returns:
        ``[L, n]`` int64 votes in {-1, 0, +1}.

    Ranking is a total order so every rank and layout votes identically: entries are sorted by
    (value, unit index) with a stable ascending sort, i.e. among equal values the lower index counts
    as *smaller* (it is the first to get -1 and the last to get +1).
    """
    if stats.dim() != 2:
        raise ValueError(f"rank_votes expects stats of shape [L, n], got {tuple(stats.shape)}")
    n = stats.shape[1]
    if k < 0 or 2 * k > n:
        raise ValueError(f"rank_votes needs 0 <= 2k <= n, got k={k}, n={n}")
    if check_nan and torch.isnan(stats).any():
        raise ValueError("rank_votes: stats contain NaN; the ranking would be undefined")
    votes = torch.zeros(stats.shape, dtype=torch.int64, device=stats.device)  # [L, n]
    if k == 0:
        return votes
    order = torch.sort(stats, dim=1, stable=True).indices  # [L, n], ascending, ties by index
    ones = torch.ones(stats.shape[0], k, dtype=torch.int64, device=stats.device)  # [L, k]
    votes.scatter_(1, order[:, :k], -ones)
    votes.scatter_(1, order[:, n - k:], ones)
    return votes


def step_scores(sq_norms: torch.Tensor, k: int, statistic: str = "rank"):
    """One step's scores from its recorded statistics.

    Args:
        sq_norms: ``[L, micro, n]`` squared norms per (layer, micro-batch, unit), whole layers.
        k: units voted up and down per micro-batch (``statistic='rank'`` only).
        statistic: one of ``STATISTICS``; only ``rank`` votes (the sort is skipped otherwise).

    Returns:
        ``(votes, sums)``: ``[L, n]`` int64 votes summed over the micro-batches (None unless ``rank``)
        and ``[L, n]`` float64 sums over the micro-batches of the units' L2 norms. All on the device of
        ``sq_norms``, without a host synchronisation (NaN passes through to the sums).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; one of {STATISTICS}")
    n_layers, micro, n = sq_norms.shape
    sums = sq_norms.double().sqrt().sum(1)
    if statistic != "rank":
        return None, sums
    return rank_votes(sq_norms.reshape(n_layers * micro, n), k, check_nan=False).view(n_layers, micro, n).sum(1), sums


def accumulate_scores(raw: torch.Tensor, step_sum: torch.Tensor, statistic: str = "rank", decay: float = 0.99) -> None:
    """Add a step's summed norms to the accumulated raw score, in place.

    ``rank``/``norm``: a plain sum. ``ema``: ``raw = decay * raw + (1 - decay) * step_sum``, a moving
    average over steps. Both are linear in the step sums, so with data-parallel ranks stepping in
    lockstep the sum of their accumulators is the accumulator of the summed step sums: reducing over
    DP at the boundary gives the same scores in every layout.
    """
    if statistic == "ema":
        raw.mul_(decay).add_(step_sum, alpha=1.0 - decay)
    else:
        raw.add_(step_sum)


def _sq_norms(x: torch.Tensor, dim) -> torch.Tensor:
    """float32 sums of squares over ``dim``, accumulated in at least fp32.

    bf16 sums over thousands of tokens would lose the low-order differences the ranking depends on.
    On a GPU: one reduction kernel that reads ``x`` once (``vector_norm`` with an fp32 accumulator)
    and an in-place square; on a CPU, where that reduction is several times slower than a plain sum,
    the squares summed in fp32.
    """
    if x.is_cuda:
        acc = torch.promote_types(x.dtype, torch.float32)
        return torch.linalg.vector_norm(x, dim=dim, dtype=acc).float().square_()
    return x.float().square().sum(dim)


def unit_sq_norms_ffn(gate_preact: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm over all tokens of SiLU(gate pre-activation), per FFN channel.

    Args:
        gate_preact: ``[s, b, f_local]`` the gate half of ``linear_fc1``'s output (before SiLU and
            before the product with the up branch).

    Returns:
        ``[f_local]`` float32 statistic.
    """
    return unit_sq_norms_silu(F.silu(gate_preact.float()))


def unit_sq_norms_silu(gate_act: torch.Tensor) -> torch.Tensor:
    """:func:`unit_sq_norms_ffn` from the SiLU output itself (``[s, b, f_local]``, any float dtype)."""
    return _sq_norms(gate_act.reshape(-1, gate_act.shape[-1]), 0)


def unit_sq_norms_attn(core_attn_out: torch.Tensor, ng_local: int) -> torch.Tensor:
    """Squared L2 norm over all tokens of each query group's attention output.

    Args:
        core_attn_out: ``[s, b, ng_local*r*d]`` the input of ``linear_proj``; group g owns the columns
            ``[g*r*d, (g+1)*r*d)`` (megatron-core's head order is group-major).
        ng_local: number of query groups held locally (a unit is a group; under MHA a head).

    Returns:
        ``[ng_local]`` float32 statistic.
    """
    width = core_attn_out.shape[-1]
    if ng_local <= 0 or width % ng_local != 0:
        raise ValueError(f"unit_sq_norms_attn: last dim {width} is not a multiple of ng_local={ng_local}")
    return _sq_norms(core_attn_out.reshape(-1, ng_local, width // ng_local), (0, 2))  # [s*b, ng_local, r*d]
