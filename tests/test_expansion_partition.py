"""Partitions and the balancing permutation: balance, minimal moves, and function preservation."""
import pytest
import torch
import torch.nn.functional as F

from megatron_apex.expansion.partition import (
    balance_permutation, invert_permutation, num_partitions, pack_partitions, permute_fc1, permute_layer_weights,
    permute_units, round_k_to_partitions, shard_positions,
)
from megatron_apex.expansion.selection import select_units


# ---- small pure-torch references with megatron-core layouts ---------------------------------------
def ref_mlp(x, w_fc1, w_fc2):
    """SwiGLU MLP: fc1 = [gate; up] (megatron-core layout)."""
    gate, up = (x @ w_fc1.t()).chunk(2, dim=-1)  # [s, f] each
    return (F.silu(gate) * up) @ w_fc2.t()  # [s, h]


def ref_attention(x, w_qkv, w_proj, nh, ng, d):
    """Causal GQA attention with megatron-core's group-interleaved fused qkv rows."""
    s = x.shape[0]
    r = nh // ng
    qkv = (x @ w_qkv.t()).view(s, ng, (r + 2) * d)  # [s, ng, (r+2)*d]
    q, k, v = torch.split(qkv, [r * d, d, d], dim=-1)
    q = q.reshape(s, nh, d).transpose(0, 1)  # [nh, s, d], head j in group j // r
    k = k.repeat_interleave(r, dim=1).transpose(0, 1)  # [nh, s, d]
    v = v.repeat_interleave(r, dim=1).transpose(0, 1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [nh, s, d]
    return o.transpose(0, 1).reshape(s, nh * d) @ w_proj.t()  # [s, h]


def _class_counts(perm, p, n, num_parts):
    size = perm.numel() // num_parts
    pset, nset = set(p.tolist()), set(n.tolist())
    out = []
    for b in range(num_parts):
        units = perm[b * size:(b + 1) * size].tolist()
        out.append((sum(u in pset for u in units), sum(u in nset for u in units)))
    return out


def test_num_partitions_and_rounding():
    assert num_partitions(32) == 8 and num_partitions(12) == 4 and num_partitions(7) == 1
    assert num_partitions(11008) == 8 and num_partitions(6, 8) == 2
    assert round_k_to_partitions(13, 4) == (12, 3) and round_k_to_partitions(3, 8) == (0, 0)


@pytest.mark.parametrize("seed", range(12))
def test_balanced_partitions_random_votes(seed):
    g = torch.Generator().manual_seed(seed)
    num_parts = [1, 2, 4, 8][seed % 4]
    n = num_parts * int(torch.randint(2, 9, (1,), generator=g))
    k, k_per = round_k_to_partitions(int(torch.randint(0, n // 2 + 1, (1,), generator=g)), num_parts)
    votes = torch.randint(-5, 6, (n,), generator=g)
    raw = torch.rand(n, generator=g, dtype=torch.float64)
    p, nn_ = select_units(votes, raw, k)
    perm, p_pos, n_pos = balance_permutation(p, nn_, n, num_parts)
    assert sorted(perm.tolist()) == list(range(n))
    assert _class_counts(perm, p, nn_, num_parts) == [(k_per, k_per)] * num_parts
    size = n // num_parts
    assert p_pos.shape == n_pos.shape == (num_parts, k_per)
    for b in range(num_parts):
        for pos_set, units in ((p_pos[b], p), (n_pos[b], nn_)):
            assert pos_set.tolist() == sorted(pos_set.tolist())
            assert all(b * size <= q < (b + 1) * size for q in pos_set.tolist())
            assert set(perm[pos_set].tolist()) <= set(units.tolist())
    # minimality: the moved units are exactly the per-partition surplus, a lower bound for any balancing
    moved = int((perm != torch.arange(n)).sum())
    cls = torch.zeros(n, dtype=torch.long)
    cls[p], cls[nn_] = 1, 2
    quota = {1: k_per, 2: k_per, 0: size - 2 * k_per}
    lower = sum(max(0, int((cls[b * size:(b + 1) * size] == c).sum()) - quota[c])
                for b in range(num_parts) for c in (0, 1, 2))
    assert moved == lower
    # deterministic
    perm2, p2, n2 = balance_permutation(p.clone(), nn_.clone(), n, num_parts)
    assert torch.equal(perm, perm2) and torch.equal(p_pos, p2) and torch.equal(n_pos, n2)


def test_already_balanced_is_identity():
    p = torch.tensor([0, 5, 8, 14])
    n = torch.tensor([3, 4, 11, 12])
    perm, p_pos, n_pos = balance_permutation(p, n, 16, 4)
    assert torch.equal(perm, torch.arange(16))
    assert p_pos.tolist() == [[0], [5], [8], [14]] and n_pos.tolist() == [[3], [4], [11], [12]]


def test_unbalanced_example_moves_few():
    # all P in partition 0, all N in partition 1 (B=2, size 4, k_per=1)
    p, n = torch.tensor([0, 1]), torch.tensor([4, 5])
    perm, p_pos, n_pos = balance_permutation(p, n, 8, 2)
    assert perm.tolist() == [0, 5, 2, 3, 4, 1, 6, 7]  # the surplus P and the surplus N swap
    assert _class_counts(perm, p, n, 2) == [(1, 1), (1, 1)]


def test_balance_errors():
    with pytest.raises(ValueError):
        balance_permutation(torch.tensor([0, 1]), torch.tensor([1, 2]), 8, 2)  # overlap
    with pytest.raises(ValueError):
        balance_permutation(torch.tensor([0, 1, 2]), torch.tensor([4, 5, 6]), 8, 2)  # k not multiple of B
    with pytest.raises(ValueError):
        balance_permutation(torch.tensor([0, 1]), torch.tensor([4, 5]), 9, 2)


def test_invert_and_permute_units():
    perm = torch.tensor([2, 0, 3, 1])
    inv = invert_permutation(perm)
    assert torch.equal(perm[inv], torch.arange(4)) and torch.equal(inv[perm], torch.arange(4))
    t = torch.arange(8).view(8, 1)
    assert permute_units(t, perm, 2, 0).view(-1).tolist() == [4, 5, 0, 1, 6, 7, 2, 3]
    assert torch.equal(permute_units(permute_units(t, perm, 2, 0), inv, 2, 0), t)
    w = torch.arange(8).view(8, 1)  # gate rows 0..3, up rows 4..7
    assert permute_fc1(w, perm).view(-1).tolist() == [2, 0, 3, 1, 6, 4, 7, 5]
    with pytest.raises(ValueError):
        permute_units(t, perm, 3, 0)


def _random_layer(h, f, nh, ng, d, seed):
    g = torch.Generator().manual_seed(seed)
    r = nh // ng
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) / s[-1] ** 0.5  # noqa: E731
    return {
        "self_attention.linear_qkv.weight": mk(ng * (r + 2) * d, h),
        "self_attention.linear_proj.weight": mk(h, nh * d),
        "mlp.linear_fc1.weight": mk(2 * f, h),
        "mlp.linear_fc2.weight": mk(h, f),
        "input_layernorm.weight": torch.ones(h, dtype=torch.float64),
    }


@pytest.mark.parametrize("nh,ng", [(4, 4), (8, 4), (8, 2)])
def test_permutation_preserves_layer_output(nh, ng):
    h, f, d = 16, 24, 4
    w = _random_layer(h, f, nh, ng, d, seed=nh + ng)
    x = torch.randn(7, h, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    b_a, b_f = num_partitions(ng, 2 if ng >= 4 else 1), num_partitions(f, 8)
    pa, na = select_units(torch.randint(-3, 4, (ng,), generator=g), torch.rand(ng, generator=g), b_a)
    pf, nf = select_units(torch.randint(-3, 4, (f,), generator=g), torch.rand(f, generator=g), b_f)
    attn_perm, _, _ = balance_permutation(pa, na, ng, b_a)
    ffn_perm, _, _ = balance_permutation(pf, nf, f, b_f)
    # make sure the test exercises a non-trivial permutation
    attn_perm = attn_perm if not torch.equal(attn_perm, torch.arange(ng)) else torch.roll(torch.arange(ng), 1)
    ffn_perm = ffn_perm if not torch.equal(ffn_perm, torch.arange(f)) else torch.roll(torch.arange(f), 3)
    wp = permute_layer_weights(w, attn_perm, ffn_perm, ng)
    assert not torch.equal(wp["mlp.linear_fc1.weight"], w["mlp.linear_fc1.weight"])
    assert wp["input_layernorm.weight"] is w["input_layernorm.weight"]
    a0 = ref_attention(x, w["self_attention.linear_qkv.weight"], w["self_attention.linear_proj.weight"], nh, ng, d)
    a1 = ref_attention(x, wp["self_attention.linear_qkv.weight"], wp["self_attention.linear_proj.weight"], nh, ng, d)
    torch.testing.assert_close(a1, a0, rtol=0, atol=1e-12)
    m0 = ref_mlp(x, w["mlp.linear_fc1.weight"], w["mlp.linear_fc2.weight"])
    m1 = ref_mlp(x, wp["mlp.linear_fc1.weight"], wp["mlp.linear_fc2.weight"])
    torch.testing.assert_close(m1, m0, rtol=0, atol=1e-12)
    # the inverse permutation restores the weights bit for bit
    back = permute_layer_weights(wp, invert_permutation(attn_perm), invert_permutation(ffn_perm), ng)
    for key in w:
        assert torch.equal(back[key], w[key])


def test_shard_positions():
    p = torch.tensor([[0, 1], [5, 6], [8, 9], [13, 15]])
    n = torch.tensor([[2, 3], [4, 7], [10, 11], [12, 14]])
    p1, n1 = shard_positions(p, n, 1, 2, 16)
    assert p1.tolist() == [[0, 1], [5, 7]] and n1.tolist() == [[2, 3], [4, 6]]
    p0, n0 = shard_positions(p, n, 0, 4, 16)
    assert p0.tolist() == [[0, 1]] and n0.tolist() == [[2, 3]]
    with pytest.raises(ValueError):
        shard_positions(p, n, 0, 3, 16)
    with pytest.raises(ValueError):  # partition 0 holds a unit of rank 1
        shard_positions(torch.tensor([[0], [9]]), torch.tensor([[12], [1]]), 0, 2, 16)


@pytest.mark.parametrize("seed", range(6))
def test_pack_partitions(seed):
    """After packing, every partition holds its P units first and its N units next (pairing and the
    order of the other units kept), and no unit leaves the partition the balancing gave it."""
    g = torch.Generator().manual_seed(seed)
    n_units, num_parts = 48, [1, 2, 4, 8][seed % 4]
    k = num_parts * (1 + seed % 3)
    p, n = select_units(torch.randint(-5, 6, (n_units,), generator=g), torch.rand(n_units, generator=g), k)
    perm, p_pos, n_pos = balance_permutation(p, n, n_units, num_parts)
    packed, pp, np_ = pack_partitions(perm, p_pos, n_pos)
    size, k_per = n_units // num_parts, k // num_parts
    assert sorted(packed.tolist()) == list(range(n_units))
    for b in range(num_parts):
        assert pp[b].tolist() == list(range(b * size, b * size + k_per))
        assert np_[b].tolist() == list(range(b * size + k_per, b * size + 2 * k_per))
        block = set(perm[b * size:(b + 1) * size].tolist())
        assert set(packed[b * size:(b + 1) * size].tolist()) == block  # nothing crossed a partition
        # the i-th P (N) unit is the unit the balancing put at the i-th P (N) position
        assert packed[pp[b]].tolist() == perm[p_pos[b]].tolist()
        assert packed[np_[b]].tolist() == perm[n_pos[b]].tolist()
        rest = [u for u in perm[b * size:(b + 1) * size].tolist()
                if u not in set(perm[p_pos[b]].tolist()) | set(perm[n_pos[b]].tolist())]
        assert packed[b * size + 2 * k_per:(b + 1) * size].tolist() == rest
    assert set(packed[pp.reshape(-1)].tolist()) == set(p.tolist())
    assert set(packed[np_.reshape(-1)].tolist()) == set(n.tolist())


def test_partitions_divide_k():
    """With k given, B also divides k: no selected unit is dropped by rounding to whole partitions."""
    assert num_partitions(32, 8, 4) == 4 and num_partitions(32, 8, 6) == 2 and num_partitions(32, 8, 8) == 8
    assert num_partitions(11008, 8, 1376) == 8 and num_partitions(176, 8, 22) == 2 and num_partitions(32, 8, 0) == 8
    for n, b_cfg, k in ((32, 8, 4), (176, 8, 22), (4, 8, 1)):
        assert round_k_to_partitions(k, num_partitions(n, b_cfg, k)) == (k, k // num_partitions(n, b_cfg, k))
