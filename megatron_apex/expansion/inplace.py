"""The operator applied once per step, in place, on the rows it changes (mode ``all``).

``W_eff`` differs from ``W`` only in the rows (columns) of the P and N units. Instead of building a
full ``W_eff`` in every linear call of every micro-batch, once per step:

1. **materialize**: gather the P and N rows of each weight, compute their ``W_eff`` rows and write
   them into the weight's storage, keeping the originals. Every micro-batch then runs the unchanged
   linear on ``W_eff``, and the gradient megatron-core accumulates in ``main_grad`` is dL/dW_eff.
2. **restore** (just before megatron-core reduces gradients): apply the chain rule of
   ``W_eff[N] = alpha * W[N] + M W[P]``, ``W_eff[P] = beta * W[P]`` to the P and N rows of
   ``main_grad`` (giving dL/dW there, and the operator's gradients), and put the original rows back.

Rows outside P and N have dL/dW = dL/dW_eff and are not touched. Row-type weights (linear_proj,
linear_fc2) are handled as their transposed columns, where the same formula holds without beta.
Weights sharing one (M, alpha) are expanded by one Monarch call on their concatenated columns. The
cost per step is a few passes over the P and N rows plus one small Monarch forward and backward
per operator, whatever the number of micro-batches or tokens. The engine falls back to building
W_eff per call for the ``selected`` mode (frozen base weights have no gradient buffer) and with
overlapped gradient reduction; a test checks that both paths agree.
"""

from __future__ import annotations

import torch

from megatron_apex.expansion.monarch import monarch_apply
from megatron_apex.expansion.operator import unit_rows


class _Segment:
    """The P and N slices of one weight under one operator: ``[B, m]`` row (or column) indices."""

    def __init__(self, kind: str, dim: int, p_idx: torch.Tensor, n_idx: torch.Tensor, beta):
        self.kind, self.dim, self.beta = kind, dim, beta
        self.shape = p_idx.shape  # [B, m]
        self.p_flat, self.n_flat = p_idx.reshape(-1), n_idx.reshape(-1)

    def read(self, t: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Rows -> [B, m, c] (columns of a row-type weight are transposed into rows)."""
        x = t.index_select(self.dim, flat)
        if self.dim == 1:
            x = x.t()
        return x.reshape(*self.shape, -1)

    def write(self, t: torch.Tensor, flat: torch.Tensor, x: torch.Tensor) -> None:
        x = x.reshape(flat.numel(), -1)
        t.index_copy_(self.dim, flat, (x.t() if self.dim == 1 else x).to(t.dtype))


class _Group:
    """Segments sharing one Monarch matrix and one alpha."""

    def __init__(self, lf, rf, alpha, segments: list):
        self.lf, self.rf, self.alpha, self.segments = lf, rf, alpha, segments
        self.saved = None

    def _weights(self, linears, s: _Segment):
        return linears[s.kind].weight

    @torch.no_grad()
    def materialize(self, linears) -> None:
        xp = [s.read(self._weights(linears, s).data, s.p_flat).float() for s in self.segments]
        xn = [s.read(self._weights(linears, s).data, s.n_flat).float() for s in self.segments]
        widths = [x.shape[-1] for x in xp]
        mixed = monarch_apply(self.lf.float(), self.rf.float(), torch.cat(xp, dim=-1)).split(widths, dim=-1)
        alpha = self.alpha.float().unsqueeze(-1)
        for s, p, n, y in zip(self.segments, xp, xn, mixed):
            w = self._weights(linears, s).data
            s.write(w, s.n_flat, alpha * n + y)
            if s.beta is not None:
                s.write(w, s.p_flat, s.beta.float().unsqueeze(-1) * p)
        self.saved = (xp, xn)

    def restore(self, linears, with_grads: bool) -> None:
        xp, xn = self.saved
        if with_grads:
            self._chain_rule(linears, xp, xn)
        with torch.no_grad():
            for s, p, n in zip(self.segments, xp, xn):
                w = self._weights(linears, s).data
                s.write(w, s.n_flat, n)
                s.write(w, s.p_flat, p)
        self.saved = None

    def _chain_rule(self, linears, xp: list, xn: list) -> None:
        gp = [s.read(self._weights(linears, s).main_grad, s.p_flat).float() for s in self.segments]
        gn = [s.read(self._weights(linears, s).main_grad, s.n_flat).float() for s in self.segments]
        alpha = self.alpha.float().unsqueeze(-1)
        # dL/dalpha, dL/dbeta: per row of the stacked units, summed over columns (and shared segments).
        d_alpha = sum((g * n).sum(-1) for g, n in zip(gn, xn))
        # dL/dM (through the Monarch factors) and M^T dL/dW_eff[N], by one small backward.
        widths = [x.shape[-1] for x in xp]
        with torch.enable_grad():
            lf, rf = self.lf.detach().float().requires_grad_(), self.rf.detach().float().requires_grad_()
            x = torch.cat(xp, dim=-1).requires_grad_()
            d_lf, d_rf, d_x = torch.autograd.grad(monarch_apply(lf, rf, x), (lf, rf, x), torch.cat(gn, dim=-1))
        with torch.no_grad():
            for s, p, g_p, g_n, d_mix in zip(self.segments, xp, gp, gn, d_x.split(widths, dim=-1)):
                main_grad = self._weights(linears, s).main_grad
                d_p = d_mix + (s.beta.float().unsqueeze(-1) * g_p if s.beta is not None else g_p)
                s.write(main_grad, s.n_flat, alpha * g_n)
                s.write(main_grad, s.p_flat, d_p)
                if s.beta is not None:
                    _accumulate(s.beta, (g_p * p).sum(-1))
            _accumulate(self.alpha, d_alpha)
            _accumulate(self.lf, d_lf)
            _accumulate(self.rf, d_rf)


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(param.dtype)
    param.grad = grad if param.grad is None else param.grad + grad


class InPlaceLayer:
    """Materialize / restore the operators of one layer shard (see the module docstring)."""

    def __init__(self, linears: dict, attn_op, ffn_op, d: int, r: int):
        self.linears = linears
        self.groups = []
        if attn_op is not None and attn_op.active:
            v_rows = lambda pos: unit_rows(pos, (r + 2) * d, (r + 1) * d, d)  # noqa: E731
            o_cols = lambda pos: unit_rows(pos, r * d, 0, r * d)  # noqa: E731
            v = _Segment("qkv", 0, v_rows(attn_op.p_pos), v_rows(attn_op.n_pos), attn_op.beta_v)
            o = _Segment("proj", 1, o_cols(attn_op.p_pos), o_cols(attn_op.n_pos), None)
            if attn_op.shared:
                self.groups.append(_Group(*attn_op._v_side(), [v, o]))
            else:
                self.groups += [_Group(*attn_op._v_side(), [v]), _Group(*attn_op._o_side(), [o])]
        if ffn_op is not None and ffn_op.active:
            f_local = linears["fc1"].weight.shape[0] // 2
            p, n = ffn_op.p_pos, ffn_op.n_pos
            self.groups.append(_Group(ffn_op.monarch_l, ffn_op.monarch_r, ffn_op.alpha, [
                _Segment("fc1", 0, p, n, ffn_op.beta_gate),
                _Segment("fc1", 0, p + f_local, n + f_local, ffn_op.beta_up),
                _Segment("fc2", 1, p, n, None)]))
        self.materialized = False

    def materialize(self) -> None:
        """Write the W_eff rows into the weights (keeping the originals)."""
        if self.materialized:
            return
        for group in self.groups:
            group.materialize(self.linears)
        self.materialized = True

    def restore(self, with_grads: bool) -> None:
        """Put the original rows back; with ``with_grads``, turn main_grad's dL/dW_eff rows into dL/dW
        rows and accumulate the operator's gradients."""
        if not self.materialized:
            return
        for group in self.groups:
            group.restore(self.linears, with_grads)
        self.materialized = False
