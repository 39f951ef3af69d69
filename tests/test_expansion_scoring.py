"""Scoring (rank votes, unit statistics) and selection (P, N, E) of the APEX core."""
import pytest
import torch
import torch.nn.functional as F

from megatron_apex.expansion.scoring import (
    accumulate_scores, rank_votes, step_scores, unit_sq_norms_attn, unit_sq_norms_ffn, unit_sq_norms_silu,
)
from megatron_apex.expansion.selection import (
    k_from_ratio, progressive_k, rank_units, select_units, select_units_partial,
)


def test_rank_votes_basic():
    stats = torch.tensor([[5.0, 1.0, 3.0, 9.0, 7.0, 2.0]])
    v = rank_votes(stats, 2)
    assert v.dtype == torch.int64
    assert v.tolist() == [[0, -1, 0, 1, 1, -1]]


def test_rank_votes_ties_lower_index_is_smaller():
    stats = torch.zeros(2, 6)
    v = rank_votes(stats, 2)
    assert v.tolist() == [[-1, -1, 0, 0, 1, 1]] * 2
    stats = torch.tensor([[1.0, 1.0, 1.0, 0.0, 2.0, 2.0]])
    assert rank_votes(stats, 2).tolist() == [[-1, 0, 0, -1, 1, 1]]


def test_rank_votes_rows_independent_and_deterministic():
    g = torch.Generator().manual_seed(0)
    stats = torch.randint(0, 4, (5, 20), generator=g).float()  # many ties
    v1, v2 = rank_votes(stats, 5), rank_votes(stats.clone(), 5)
    assert torch.equal(v1, v2)
    assert (v1 == 1).sum(1).tolist() == [5] * 5 and (v1 == -1).sum(1).tolist() == [5] * 5
    for row in range(5):
        assert torch.equal(v1[row:row + 1], rank_votes(stats[row:row + 1], 5))
        # every +1 unit has a statistic >= every -1 unit's
        assert stats[row][v1[row] == 1].min() >= stats[row][v1[row] == -1].max()


def test_rank_votes_edge_cases():
    assert torch.equal(rank_votes(torch.randn(3, 4), 0), torch.zeros(3, 4, dtype=torch.int64))
    assert rank_votes(torch.tensor([[2.0, 1.0]]), 1).tolist() == [[1, -1]]
    with pytest.raises(ValueError):
        rank_votes(torch.randn(2, 5), 3)
    with pytest.raises(ValueError):
        rank_votes(torch.randn(2, 5), -1)
    with pytest.raises(ValueError):
        rank_votes(torch.randn(5), 1)
    with pytest.raises(ValueError):
        rank_votes(torch.tensor([[float("nan"), 1.0]]), 1)


def test_unit_sq_norms_ffn():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    got = unit_sq_norms_ffn(x.to(torch.bfloat16))
    assert got.dtype == torch.float32 and got.shape == (6,)
    ref = (F.silu(x.to(torch.bfloat16).double()) ** 2).sum((0, 1))
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    # From the SiLU output itself (what the engine records from megatron-core's own SiLU).
    act = F.silu(x)
    torch.testing.assert_close(unit_sq_norms_silu(act).double(), (act ** 2).sum((0, 1)), rtol=1e-6, atol=1e-6)


def test_unit_sq_norms_attn_groups_columns():
    s, b, ng, r, d = 3, 2, 4, 2, 3
    x = torch.randn(s, b, ng * r * d, dtype=torch.float64)
    got = unit_sq_norms_attn(x, ng)
    assert got.dtype == torch.float32 and got.shape == (ng,)
    for g in range(ng):
        ref = x[..., g * r * d:(g + 1) * r * d].pow(2).sum()
        torch.testing.assert_close(got[g].double(), ref, rtol=1e-6, atol=0)
    with pytest.raises(ValueError):
        unit_sq_norms_attn(torch.randn(2, 2, 10), 3)


def test_select_units_order_and_ties():
    votes = torch.tensor([3, -2, 3, 0, -2, 1, 0, -2])
    raw = torch.tensor([1.0, 5.0, 1.0, 0.0, 5.0, 0.0, 0.0, 4.0])
    p, n = select_units(votes, raw, 2)
    # votes 3 at units 0, 2 (tie on raw -> lower index first): P = {0, 2}
    assert p.tolist() == [0, 2]
    # lowest votes -2 at 1, 4, 7; raw asc: 7 (4.0) first, then 1 and 4 tie on raw -> higher index lower
    assert n.tolist() == [4, 7]
    order = rank_units(votes, raw)
    assert order.tolist() == [0, 2, 5, 3, 6, 1, 4, 7]


def test_select_units_disjoint_deterministic_random():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        n = int(torch.randint(2, 40, (1,), generator=g))
        votes = torch.randint(-3, 4, (n,), generator=g)
        raw = torch.randint(0, 3, (n,), generator=g).double()
        k = int(torch.randint(0, n // 2 + 1, (1,), generator=g))
        p, nn_ = select_units(votes, raw, k)
        p2, n2 = select_units(votes.clone(), raw.clone(), k)
        assert torch.equal(p, p2) and torch.equal(nn_, n2)
        assert len(set(p.tolist()) & set(nn_.tolist())) == 0
        assert p.tolist() == sorted(p.tolist()) and len(p) == k == len(nn_)
        if k:
            key = lambda u: (int(votes[u]), float(raw[u]), -u)  # noqa: E731
            assert min(key(u) for u in p.tolist()) > max(key(u) for u in range(n) if u not in p.tolist())
            assert max(key(u) for u in nn_.tolist()) < min(key(u) for u in range(n) if u not in nn_.tolist())


def test_select_units_exclude_and_partial():
    votes = torch.arange(10)  # unit i has score i
    raw = torch.zeros(10)
    excl = torch.zeros(10, dtype=torch.bool)
    excl[[0, 9]] = True
    p, n = select_units(votes, raw, 2, exclude=excl)
    assert p.tolist() == [7, 8] and n.tolist() == [1, 2]
    p, n, e = select_units_partial(votes, raw, 2, 3)
    assert p.tolist() == [8, 9] and n.tolist() == [0, 1] and e.tolist() == [2, 3, 4]
    with pytest.raises(ValueError):
        select_units(votes, raw, 5, exclude=excl)
    with pytest.raises(ValueError):
        select_units(votes, raw, 6)
    with pytest.raises(ValueError):
        select_units(votes, raw, -1)
    with pytest.raises(ValueError):
        select_units_partial(votes, raw, 3, 5)
    with pytest.raises(ValueError):
        select_units(votes, raw[:5], 1)


def test_progressive_k_and_ratio():
    assert [progressive_k(12, s) for s in range(5)] == [12, 6, 3, 1, 1]
    assert [progressive_k(12, s, progressive=False) for s in range(3)] == [12, 12, 12]
    # With B partitions: multiples of B, never below B (a halved stage still expands).
    assert [progressive_k(16, s, num_parts=8) for s in range(4)] == [16, 8, 8, 8]
    assert [progressive_k(12, s, num_parts=4) for s in range(4)] == [12, 4, 4, 4]
    assert progressive_k(0, 2, num_parts=4) == 0
    with pytest.raises(ValueError, match="num_parts"):
        progressive_k(4, 0, num_parts=0)
    assert k_from_ratio(0.1875, 32) == 6 and k_from_ratio(0.125, 11008) == 1376
    with pytest.raises(ValueError):
        k_from_ratio(0.6, 10)


def test_step_scores_per_statistic():
    """rank: votes of every micro-batch summed; all statistics: the sum of the non-squared norms."""
    sq = torch.rand(3, 4, 10, generator=torch.Generator().manual_seed(0))  # [L, micro, n] squared norms
    votes, sums = step_scores(sq, 2, "rank")
    assert torch.equal(votes, rank_votes(sq.reshape(12, 10), 2).view(3, 4, 10).sum(1))
    assert sums.dtype == torch.float64
    torch.testing.assert_close(sums, sq.double().sqrt().sum(1), rtol=0, atol=0)
    for statistic in ("norm", "ema"):
        v, s = step_scores(sq, 2, statistic)
        assert v is None and torch.equal(s, sums)  # no vote sort
    with pytest.raises(ValueError, match="unknown statistic"):
        step_scores(sq, 2, "mean")


def test_accumulate_scores_ema_is_linear_over_ranks():
    """raw = d raw + (1 - d) step_sum; two data-parallel ranks' EMAs add up to the EMA of the summed
    step sums (what the boundary's reduction relies on), while 'norm' just sums."""
    g = torch.Generator().manual_seed(1)
    steps = [[torch.rand(2, 5, generator=g, dtype=torch.float64) for _ in range(2)] for _ in range(4)]  # [step][rank]
    per_rank = [torch.zeros(2, 5, dtype=torch.float64) for _ in range(2)]
    joint, plain = torch.zeros(2, 5, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64)
    expected = torch.zeros(2, 5, dtype=torch.float64)
    for s in steps:
        for acc, x in zip(per_rank, s):
            accumulate_scores(acc, x, "ema", 0.8)
        accumulate_scores(joint, s[0] + s[1], "ema", 0.8)
        accumulate_scores(plain, s[0] + s[1], "norm")
        expected = 0.8 * expected + 0.2 * (s[0] + s[1])
    torch.testing.assert_close(per_rank[0] + per_rank[1], joint, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(joint, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(plain, sum(s[0] + s[1] for s in steps), rtol=1e-14, atol=1e-14)
