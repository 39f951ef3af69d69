"""Monarch factorisation: shape rule, factored apply vs dense construction, init, parameter count."""
import math

import pytest
import torch

from megatron_apex.expansion.monarch import (
    bmm_abt, monarch_apply, monarch_backward, monarch_forward, monarch_init, monarch_num_params, monarch_shape,
    monarch_to_dense,
)


def _closest_divisor(m):
    divs = [x for x in range(1, m + 1) if m % x == 0]
    return min(divs, key=lambda x: (abs(x - math.sqrt(m)), x))


@pytest.mark.parametrize("m", list(range(1, 70)) + [768, 2064, 1376])
def test_monarch_shape_rule(m):
    nb, bs = monarch_shape(m)
    assert nb * bs == m and nb == _closest_divisor(m)


def test_monarch_shape_with_block_count():
    """apex.monarch_blocks = n > 0: nb = the divisor of m closest to n, ties to the smaller."""
    for m in list(range(1, 40)) + [768, 2064]:
        divs = [x for x in range(1, m + 1) if m % x == 0]
        for blocks in (1, 2, 3, 5, 8, 1000):
            nb, bs = monarch_shape(m, blocks)
            assert nb * bs == m and nb == min(divs, key=lambda x: (abs(x - blocks), x)), (m, blocks)
            assert monarch_num_params(m, blocks) == m * (nb + bs)


def test_monarch_shape_block_count_examples_and_default():
    assert monarch_shape(16, 3) == (2, 8)     # 2 and 4 are equally close to 3: the smaller
    assert monarch_shape(12, 5) == (4, 3)     # 4 and 6 tie: 4
    assert monarch_shape(12, 6) == (6, 2)     # a divisor itself
    assert monarch_shape(7, 3) == (1, 7)      # a prime: 1 is closer than 7
    assert monarch_shape(16, 1000) == (16, 1)
    for m in range(1, 200):  # 0 keeps the released rule (closest to sqrt(m))
        assert monarch_shape(m, 0) == monarch_shape(m)
        assert monarch_num_params(m, 0) == monarch_num_params(m)
    with pytest.raises(ValueError, match="blocks >= 0"):
        monarch_shape(12, -1)


def test_init_with_block_count():
    lf, rf = monarch_init(3, 12, torch.Generator().manual_seed(0), torch.float64, blocks=6)
    assert lf.shape == (3, 2, 6, 6) and rf.shape == (3, 6, 2, 2)
    assert torch.count_nonzero(lf) == 0 and rf.abs().max() <= 1 / math.sqrt(2)
    # The default block count spelled out draws exactly what the default draws.
    nb = monarch_shape(12)[0]
    a = monarch_init(3, 12, torch.Generator().manual_seed(1), torch.float64)
    b = monarch_init(3, 12, torch.Generator().manual_seed(1), torch.float64, blocks=nb)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _random_factors(nparts, m, seed, blocks=0):
    g = torch.Generator().manual_seed(seed)
    nb, bs = monarch_shape(m, blocks)
    lf = torch.randn(nparts, bs, nb, nb, generator=g, dtype=torch.float64)
    rf = torch.randn(nparts, nb, bs, bs, generator=g, dtype=torch.float64)
    return lf, rf


def _dense_by_steps(lf, rf):
    """Third, literal construction: R block-diag, explicit permutation matrix, L block-diag, permutation."""
    out = []
    for b in range(lf.shape[0]):
        bs, nb = lf.shape[1], lf.shape[2]
        m = nb * bs
        r_bd = torch.block_diag(*rf[b])  # acts on x as (nb, bs)
        l_bd = torch.block_diag(*lf[b])  # acts on x as (bs, nb)
        perm = torch.zeros(m, m, dtype=lf.dtype)  # (nb, bs) -> (bs, nb)
        for i in range(nb):
            for j in range(bs):
                perm[j * nb + i, i * bs + j] = 1
        out.append(perm.t() @ l_bd @ perm @ r_bd)
    return torch.stack(out)


@pytest.mark.parametrize("m", [1, 2, 6, 7, 12, 16, 30])
def test_apply_matches_dense(m):
    lf, rf = _random_factors(3, m, seed=m)
    x = torch.randn(3, m, 5, dtype=torch.float64)
    dense = monarch_to_dense(lf, rf)
    assert dense.shape == (3, m, m)
    torch.testing.assert_close(monarch_apply(lf, rf, x), dense @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense, _dense_by_steps(lf, rf), rtol=1e-12, atol=1e-12)
    eye = torch.eye(m, dtype=torch.float64).expand(3, m, m)
    torch.testing.assert_close(monarch_apply(lf, rf, eye), dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m,blocks", [(12, 6), (12, 1), (16, 8), (30, 2), (30, 3)])
def test_apply_matches_dense_with_block_count(m, blocks):
    lf, rf = _random_factors(2, m, seed=m + blocks, blocks=blocks)
    assert lf.shape[2] == monarch_shape(m, blocks)[0] != monarch_shape(m)[0]  # really another layout
    x = torch.randn(2, m, 4, dtype=torch.float64)
    dense = monarch_to_dense(lf, rf)
    torch.testing.assert_close(monarch_apply(lf, rf, x), dense @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense, _dense_by_steps(lf, rf), rtol=1e-12, atol=1e-12)


def test_init_is_zero_and_param_count():
    g = torch.Generator().manual_seed(0)
    lf, rf = monarch_init(4, 12, g, torch.float32)
    nb, bs = monarch_shape(12)
    assert lf.shape == (4, bs, nb, nb) and rf.shape == (4, nb, bs, bs)
    assert torch.count_nonzero(lf) == 0 and torch.count_nonzero(rf) == rf.numel()
    assert rf.abs().max() <= 1 / math.sqrt(bs)
    assert torch.equal(monarch_to_dense(lf, rf), torch.zeros(4, 12, 12))
    assert lf[0].numel() + rf[0].numel() == monarch_num_params(12) == 12 * (nb + bs)
    assert monarch_num_params(2064) == 2064 * (43 + 48)
    lf2, rf2 = monarch_init(4, 12, torch.Generator().manual_seed(0), torch.float64)
    assert torch.equal(rf2.float(), rf)  # same draw whatever the dtype


def test_apply_rejects_bad_shapes():
    lf, rf = _random_factors(2, 6, 0)
    with pytest.raises(ValueError):
        monarch_apply(lf, rf, torch.randn(2, 7, 3, dtype=torch.float64))


@pytest.mark.parametrize("m", [12, 32, 88])
def test_closed_form_backward_matches_autograd(m):
    """monarch_backward (used by the in-place operator) equals autograd through monarch_apply."""
    g = torch.Generator().manual_seed(m)
    lf, rf = monarch_init(3, m, g, dtype=torch.float64)
    lf = torch.randn(lf.shape, generator=g, dtype=torch.float64).requires_grad_()
    rf = rf.clone().requires_grad_()
    x = torch.randn(3, m, 7, generator=g, dtype=torch.float64).requires_grad_()
    grad = torch.randn(3, m, 7, generator=g, dtype=torch.float64)
    ref = torch.autograd.grad(monarch_apply(lf, rf, x), (lf, rf, x), grad)
    with torch.no_grad():
        got = monarch_backward(lf, rf, x, monarch_forward(lf, rf, x)[1], grad)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
def test_bmm_abt_splits_equal_one_product(splits):
    """bmm_abt cuts the K sum into batches (the GPU path of the factors' gradients): same product."""
    g = torch.Generator().manual_seed(splits)
    a = torch.randn(5, 4, 48, generator=g, dtype=torch.float64)
    b = torch.randn(5, 3, 48, generator=g, dtype=torch.float64)
    torch.testing.assert_close(bmm_abt(a, b, splits), a @ b.transpose(1, 2), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="not a multiple"):
        bmm_abt(a, b, 5)


def test_closed_form_backward_with_split_products_matches_autograd(monkeypatch):
    """monarch_backward with its factor gradients split over the columns (what runs on a GPU)."""
    from megatron_apex.expansion import monarch

    monkeypatch.setattr(monarch, "_splits", lambda x: 4)
    g = torch.Generator().manual_seed(1)
    lf, rf = monarch_init(2, 12, g, dtype=torch.float64)
    lf = torch.randn(lf.shape, generator=g, dtype=torch.float64).requires_grad_()
    rf = rf.clone().requires_grad_()
    x = torch.randn(2, 12, 24, generator=g, dtype=torch.float64).requires_grad_()
    grad = torch.randn(2, 12, 24, generator=g, dtype=torch.float64)
    ref = torch.autograd.grad(monarch_apply(lf, rf, x), (lf, rf, x), grad)
    with torch.no_grad():
        got = monarch_backward(lf, rf, x, monarch_forward(lf, rf, x)[1], grad)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
