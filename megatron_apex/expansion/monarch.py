"""Monarch matrices: the structured m x m mixing matrix M of the APEX operator, batched over partitions.

Why Monarch: a dense M would cost m^2 parameters (m = k * rows per unit, e.g. 2064 FFN channels in a 7B
layer); a Monarch matrix costs m * (nb + bs) ~ 2 m sqrt(m), as in the released APEX code.

Layout (fixed; checkpoints depend on it), with m = nb * bs and x of length m viewed as ``(nb, bs)``
(x[i*bs + j] = X[i, j]):

1. R: ``[nb, bs, bs]`` block-diagonal, Y[i, :] = R[i] @ X[i, :]
2. transpose (nb, bs) -> (bs, nb)
3. L: ``[bs, nb, nb]`` block-diagonal, U[j, :] = L[j] @ Y[:, j]
4. transpose back: out[i*bs + j] = U[j, i]

Hence the dense entry M[(i, j), (k, l)] = L[j, i, k] * R[k, j, l]; :func:`monarch_to_dense` builds M from
this formula, independently of the factored product in :func:`monarch_apply`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["monarch_shape", "monarch_num_params", "monarch_apply", "monarch_forward", "monarch_right",
           "monarch_backward", "monarch_to_dense", "monarch_init", "bmm_abt"]


def monarch_shape(m: int, blocks: int = 0) -> Tuple[int, int]:
    """(nb, bs) with nb * bs = m: nb = the divisor of m closest to sqrt(m) (``blocks`` = 0, the released
    rule) or closest to ``blocks`` (``apex.monarch_blocks`` > 0); ties -> the smaller; bs = m // nb."""
    if m <= 0:
        raise ValueError(f"monarch_shape needs m > 0, got {m}")
    if blocks < 0:
        raise ValueError(f"monarch_shape needs blocks >= 0, got {blocks}")
    target = blocks if blocks else math.sqrt(m)
    small = [x for x in range(1, math.isqrt(m) + 1) if m % x == 0]
    best = min(small + [m // x for x in small], key=lambda x: (abs(x - target), x))
    return best, m // best


def monarch_num_params(m: int, blocks: int = 0) -> int:
    """Parameters of one m x m Monarch matrix: R has nb*bs*bs = m*bs, L has bs*nb*nb = m*nb."""
    nb, bs = monarch_shape(m, blocks)
    return m * (bs + nb)


def monarch_apply(lf: torch.Tensor, rf: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """M_b @ X_b for every partition b, in O(B * m * (nb + bs) * c) without forming M.

    Args:
        lf: ``[B, bs, nb, nb]`` left factor.
        rf: ``[B, nb, bs, bs]`` right factor.
        x: ``[B, m, c]``.

    Returns:
        ``[B, m, c]``.
    """
    nparts, bs, nb, _ = lf.shape
    m, c = x.shape[1], x.shape[2]
    if rf.shape != (nparts, nb, bs, bs) or x.shape[0] != nparts or m != nb * bs:
        raise ValueError(f"monarch_apply: inconsistent shapes L{tuple(lf.shape)} R{tuple(rf.shape)} X{tuple(x.shape)}")
    return monarch_forward(lf, rf, x)[0]


def monarch_right(rf: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The intermediate ``y_t [B, bs, nb, c]`` of :func:`monarch_forward` (``y_t[b, j, k] = (R x)[b, k, j]``):
    one ``bmm`` over the ``B*nb`` blocks of ``x``, then a block transpose. :func:`monarch_backward`
    needs it; recomputing it is cheaper than keeping it between forward and backward."""
    nparts, nb, bs, _ = rf.shape
    c = x.shape[-1]
    y = torch.bmm(rf.reshape(nparts * nb, bs, bs), x.reshape(nparts * nb, bs, c))  # [B*nb, bs, c]
    return y.view(nparts, nb, bs, c).transpose(1, 2).contiguous()  # [B, bs, nb, c]


def monarch_forward(lf: torch.Tensor, rf: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`monarch_apply` (no shape checks) that also returns what :func:`monarch_backward` needs.

    Every product is one ``bmm`` on contiguous operands: R over the ``B*nb`` blocks of ``x``, then L
    over the ``B*bs`` columns of the block-transposed intermediate. Returns ``(out [B, m, c],
    y_t [B, bs, nb, c])`` where ``y_t[b, j, k] = (R x)[b, k, j]``.
    """
    nparts, bs, nb, _ = lf.shape
    c = x.shape[-1]
    y_t = monarch_right(rf, x)  # [B, bs, nb, c]
    u_t = torch.bmm(lf.reshape(nparts * bs, nb, nb), y_t.view(nparts * bs, nb, c))  # [B*bs, nb, c]
    return u_t.view(nparts, bs, nb, c).transpose(1, 2).reshape(nparts, nb * bs, c), y_t


def bmm_abt(a: torch.Tensor, b: torch.Tensor, splits: int = 1) -> torch.Tensor:
    """``a @ b^T`` per batch (``a [N, p, K]``, ``b [N, r, K]`` -> ``[N, p, r]``), with the K sum cut into
    ``splits`` chunks computed as separate batches and added.

    The factors' gradients are such products: tiny outputs (nb x nb, bs x bs) over K = the rows' full
    width (thousands), which a GPU GEMM spreads over only as many thread blocks as there are output
    tiles; split, the same work runs on ``splits`` times as many (one copy of each operand to make the
    chunks batches).
    """
    if splits <= 1:
        return torch.bmm(a, b.transpose(1, 2))
    n, p, k = a.shape
    r = b.shape[1]
    if k % splits:
        raise ValueError(f"bmm_abt: K={k} is not a multiple of splits={splits}")
    chunks = lambda t, rows: t.view(n, rows, splits, k // splits).transpose(1, 2).reshape(n * splits, rows, k // splits)  # noqa: E731
    return torch.bmm(chunks(a, p), chunks(b, r).transpose(1, 2)).view(n, splits, p, r).sum(1)


def _splits(x: torch.Tensor) -> int:
    """K-splits for :func:`bmm_abt` on a GPU: chunks of at least 512 columns, at most 16 of them; on a
    CPU (where a GEMM's threads are few and the copy is not free) none."""
    k = x.shape[-1]
    if not x.is_cuda:
        return 1
    return next((q for q in (16, 12, 8, 6, 4, 3, 2) if k % q == 0 and k // q >= 512), 1)


def monarch_backward(
    lf: torch.Tensor, rf: torch.Tensor, x: torch.Tensor, y_t: torch.Tensor, grad: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form vector-Jacobian product of :func:`monarch_apply`, without autograd.

    Args:
        lf, rf, x: the inputs of the forward; ``y_t`` the intermediate :func:`monarch_forward` returned.
        grad: ``[B, m, c]`` dL/d(output).

    Returns:
        (dL/dlf, dL/drf, dL/dx), shaped like lf, rf, x. With U_j = L_j Y_j per column block j and
        Y_i = R_i X_i per row block i: dL_j = dU_j Y_j^T, dY_j = L_j^T dU_j, dR_i = dY_i X_i^T,
        dX_i = R_i^T dY_i (four bmm, two block transposes; the two factor gradients split over the
        columns on a GPU, see :func:`bmm_abt`).
    """
    nparts, bs, nb, _ = lf.shape
    c = x.shape[-1]
    du_t = grad.reshape(nparts, nb, bs, c).transpose(1, 2).reshape(nparts * bs, nb, c)  # [B*bs, nb(i), c]
    y_t = y_t.view(nparts * bs, nb, c)
    splits = _splits(x)
    d_lf = bmm_abt(du_t, y_t, splits).view(lf.shape)  # [B*bs, nb(i), nb(k)]
    d_y_t = torch.bmm(lf.reshape(nparts * bs, nb, nb).transpose(1, 2), du_t)  # [B*bs, nb(k), c]
    d_y = d_y_t.view(nparts, bs, nb, c).transpose(1, 2).reshape(nparts * nb, bs, c)  # [B*nb, bs(p), c]
    xb = x.reshape(nparts * nb, bs, c)
    d_rf = bmm_abt(d_y, xb, splits).view(rf.shape)  # [B*nb, bs(p), bs(q)]
    d_x = torch.bmm(rf.reshape(nparts * nb, bs, bs).transpose(1, 2), d_y)  # [B*nb, bs(q), c]
    return d_lf, d_rf, d_x.view(x.shape)


def monarch_to_dense(lf: torch.Tensor, rf: torch.Tensor) -> torch.Tensor:
    """Dense ``[B, m, m]`` matrices, from M[(i,j),(k,l)] = L[j,i,k] * R[k,j,l] (for tests and fusing checks)."""
    nparts, bs, nb, _ = lf.shape
    d = torch.einsum("bjik,bkjl->bijkl", lf, rf)  # [B, nb, bs, nb, bs]
    return d.reshape(nparts, nb * bs, nb * bs)


def monarch_init(
    num_parts: int,
    m: int,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
    blocks: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Factors of a zero Monarch matrix: L = 0, R ~ U(-1/sqrt(bs), 1/sqrt(bs)) (kaiming-uniform, a=sqrt(5)).

    M = L.R = 0, so inserting the operator does not change the function; R random gives L a non-zero
    gradient from the first step. The random draw is made on CPU in float64 and then cast, so it is the
    same on every device and dtype given the same generator state. ``blocks``: see :func:`monarch_shape`.
    """
    nb, bs = monarch_shape(m, blocks)
    bound = 1.0 / math.sqrt(bs)
    rf = torch.rand(num_parts, nb, bs, bs, generator=generator, dtype=torch.float64)  # [B, nb, bs, bs]
    rf = ((rf * 2 - 1) * bound).to(dtype=dtype, device=device)
    lf = torch.zeros(num_parts, bs, nb, nb, dtype=dtype, device=device)  # [B, bs, nb, nb]
    return lf, rf
