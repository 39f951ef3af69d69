"""The APEX expansion operator on weights: W_eff = f(W, M, alpha, beta), and fusing it back into W.

Formulas (docs/method.md, "The operator"), per partition b with P and N paired by ascending position:

    column-type (V rows of linear_qkv, gate and up rows of linear_fc1):
        W_eff[N] = diag(alpha) W[N] + M W[P];   W_eff[P] = diag(beta) W[P];   other rows unchanged
    row-type (linear_proj and linear_fc2 columns):
        W_eff[:, N] = W[:, N] diag(alpha) + W[:, P] M^T;                      other columns unchanged

A bias on the V rows (Qwen2's QKV bias) is one more column of those rows ([W | b] acting on [x; 1]), so the
same formula expands it: b_eff[N] = alpha b[N] + M b[P], b_eff[P] = beta b[P] (``effective_qkv_bias``).

W[P] stacks the rows of the P units unit-major (unit 0's rows, then unit 1's, ...), so m = k_per * rows
per unit, and M is block-diagonal over partitions (one Monarch matrix per partition, see partition.py).

Why on the weights: the cost is O(m sqrt(m) h) plus one copy of W per linear per step, independent of the
batch size; the linear layer itself stays an ordinary GEMM. Everything is differentiable (index_select ->
Monarch -> index_copy into a clone), so gradients reach W, the Monarch factors, alpha and beta. The engine
calls ``effective_*`` (or ``forward(kind, w)`` through ``torch.func.functional_call``) once per forward.

The small per-unit arithmetic is done in the wider of the weight and operator dtypes and cast back to the
weight dtype, so bf16 weights with fp32 operator parameters lose nothing extra.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .monarch import monarch_apply, monarch_init, monarch_num_params, monarch_to_dense
from .partition import local_blocks, shard_positions

logger = logging.getLogger(__name__)

__all__ = [
    "unit_rows",
    "expand_columns",
    "expand_rows",
    "FFNExpansion",
    "AttentionExpansion",
    "ffn_operator_num_params",
    "attn_operator_num_params",
    "shard_expansion_state",
    "fuse_layer_weights",
    "monarch_sq_norms",
    "monarch_summary",
    "state_shape_mismatches",
]


def unit_rows(pos: torch.Tensor, stride: int, offset: int, size: int) -> torch.Tensor:
    """Row (or column) indices of units: ``[B, k]`` unit positions -> ``[B, k*size]`` indices.

    Unit u occupies ``[u*stride + offset, u*stride + offset + size)``; e.g. V rows of group u in
    linear_qkv: stride (r+2)*d, offset (r+1)*d, size d.
    """
    ar = torch.arange(size, dtype=pos.dtype, device=pos.device)  # [size]
    idx = pos.unsqueeze(-1) * stride + offset + ar  # [B, k, size]
    return idx.reshape(pos.shape[0], -1)


def _compute_dtype(w: torch.Tensor, p: torch.Tensor) -> torch.dtype:
    return torch.promote_types(w.dtype, p.dtype)


class _ReplaceSlices(torch.autograd.Function):
    """out = w with slices ``dst`` (along ``dim``) replaced by ``fn(w.index_select(dim, src), *params)``.

    Why a custom Function: composing index_select and index_copy in plain autograd makes every
    index_select's backward allocate and zero a full-size gradient and then sum them, several full passes
    over W per step for a change that touches a few percent of its rows. Here the backward makes exactly
    one full-size tensor (grad_out with the replaced slices zeroed, plus a scatter-add of the small
    gathered gradient). The small function ``fn`` is recomputed under autograd in the backward (its cost
    is O(m sqrt(m) h), negligible). Double backward is not supported.
    """

    @staticmethod
    def forward(ctx, w, dim, src, dst, fn, *params):  # noqa: D401
        sel = w.detach().index_select(dim, src)
        with torch.no_grad():
            vals = fn(sel, *params)
        ctx.dim, ctx.fn = dim, fn
        ctx.save_for_backward(sel, src, dst, *params)
        return w.detach().index_copy(dim, dst, vals)

    @staticmethod
    def backward(ctx, grad):
        sel, src, dst, *params = ctx.saved_tensors
        dim, needs = ctx.dim, ctx.needs_input_grad
        inputs = [sel.detach().requires_grad_(needs[0])]
        inputs += [p.detach().requires_grad_(needs[5 + i]) for i, p in enumerate(params)]
        wanted = [t for t in inputs if t.requires_grad]
        grads = {}
        if wanted:
            with torch.enable_grad():
                vals = ctx.fn(*inputs)
            got = torch.autograd.grad(vals, wanted, grad.index_select(dim, dst), allow_unused=True)
            grads = {id(t): g for t, g in zip(wanted, got)}
        grad_w = None
        if needs[0]:
            grad_w = grad.index_fill(dim, dst, 0)  # the one full-size copy
            g_sel = grads.get(id(inputs[0]))
            if g_sel is not None:  # index_put_ (accumulate) is several times faster than index_add_ on CPU
                if dim == 0:
                    grad_w.index_put_((src,), g_sel, accumulate=True)
                else:
                    grad_w.t().index_put_((src,), g_sel.t(), accumulate=True)  # in place through the view
        grad_params = [grads.get(id(t)) if t.requires_grad else None for t in inputs[1:]]
        return (grad_w, None, None, None, None, *grad_params)


def expand_columns(
    w: torch.Tensor,
    p_rows: torch.Tensor,
    n_rows: torch.Tensor,
    lf: torch.Tensor,
    rf: torch.Tensor,
    alpha: torch.Tensor,
    betas: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Column-type expansion of ``w`` ``[rows, h]`` for S row segments sharing one (M, alpha).

    Args:
        p_rows, n_rows: ``[B, m]`` or ``[S, B, m]`` row indices of the P and N rows (S segments, e.g. gate
            and up of fc1, share M and alpha; M acts on each segment separately).
        lf, rf: Monarch factors ``[B, bs, nb, nb]``, ``[B, nb, bs, bs]``.
        alpha: ``[B, m]``.
        betas: ``[B, m]`` / ``[S, B, m]`` per-segment beta, or None to leave the P rows unchanged.

    Returns a new ``[rows, h]`` tensor (one copy of w; differentiable in every input).
    """
    if p_rows.dim() == 2:
        p_rows, n_rows = p_rows.unsqueeze(0), n_rows.unsqueeze(0)
        betas = None if betas is None else betas.unsqueeze(0)
    nseg, nparts, m = p_rows.shape
    h = w.shape[1]
    ct = _compute_dtype(w, lf)
    p_idx, n_idx = p_rows.reshape(-1), n_rows.reshape(-1)  # [S*B*m]
    k = p_idx.numel()

    def new_rows(sel, lf_, rf_, alpha_, *betas_):
        sel = sel.to(ct)
        wp = sel[:k].view(nseg, nparts, m, h)  # [S, B, m, h]
        wn = sel[k:].view(nseg, nparts, m, h)  # [S, B, m, h]
        x = wp.permute(1, 2, 0, 3).reshape(nparts, m, nseg * h)  # [B, m, S*h]: M mixes each segment
        mx = monarch_apply(lf_.to(ct), rf_.to(ct), x).view(nparts, m, nseg, h).permute(2, 0, 1, 3)  # [S, B, m, h]
        vals = (alpha_.to(ct).unsqueeze(-1) * wn + mx).reshape(-1, h)  # new N rows
        if betas_:
            vals = torch.cat([vals, (betas_[0].to(ct).unsqueeze(-1) * wp).reshape(-1, h)])  # + new P rows
        return vals.to(w.dtype)

    src = torch.cat([p_idx, n_idx])
    dst = n_idx if betas is None else torch.cat([n_idx, p_idx])
    params = (lf, rf, alpha) if betas is None else (lf, rf, alpha, betas)
    return _ReplaceSlices.apply(w, 0, src, dst, new_rows, *params)


def expand_rows(
    w: torch.Tensor, p_cols: torch.Tensor, n_cols: torch.Tensor, lf: torch.Tensor, rf: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """Row-type expansion of ``w`` ``[h, cols]``: W_eff[:, N] = W[:, N] diag(alpha) + W[:, P] M^T.

    ``p_cols``/``n_cols``: ``[B, m]`` column indices. Returns a new ``[h, cols]`` tensor.
    """
    nparts, m = p_cols.shape
    h = w.shape[0]
    ct = _compute_dtype(w, lf)
    p_idx, n_idx = p_cols.reshape(-1), n_cols.reshape(-1)  # [B*m]
    k = p_idx.numel()

    def new_cols(sel, lf_, rf_, alpha_):
        sel = sel.to(ct)  # [h, 2*B*m]
        xp = sel[:, :k].t().reshape(nparts, m, h)  # [B, m, h] = W[:, P]^T
        mx = monarch_apply(lf_.to(ct), rf_.to(ct), xp).reshape(nparts * m, h).t()  # [h, B*m] = W[:, P] M^T
        return (sel[:, k:] * alpha_.to(ct).reshape(1, -1) + mx).to(w.dtype)  # [h, B*m]

    return _ReplaceSlices.apply(w, 1, torch.cat([p_idx, n_idx]), n_idx, new_cols, lf, rf, alpha)


def ffn_operator_num_params(num_parts: int, k_per: int, blocks: int = 0) -> int:
    """FFN operator parameters: B Monarch matrices of m = k_per, alpha, beta_gate, beta_up."""
    if k_per == 0:
        return 0
    return num_parts * (monarch_num_params(k_per, blocks) + 3 * k_per)


def attn_operator_num_params(num_parts: int, k_per: int, d: int, r: int, blocks: int = 0) -> int:
    """Attention operator parameters: shared (M, alpha) under MHA, separate V and O sides under GQA."""
    if k_per == 0:
        return 0
    m_v, m_o = k_per * d, k_per * r * d
    if r == 1:
        return num_parts * (monarch_num_params(m_v, blocks) + 2 * m_v)
    return num_parts * (monarch_num_params(m_v, blocks) + 2 * m_v + monarch_num_params(m_o, blocks) + m_o)


def _refresh_after_load(module: "_ExpansionBase", _incompatible_keys) -> None:
    """load_state_dict post-hook (module-level, so the operators stay picklable)."""
    module._refresh_pos_max()


class _ExpansionBase(nn.Module):
    """Positions buffers and their bookkeeping, shared by the FFN and attention operators.

    ``p_pos``/``n_pos`` ``[B_local, k_per]`` are LOCAL unit positions (see :func:`shard_positions`); they
    are persistent buffers so a mid-stage checkpoint carries them. They start at -1 and every effective_*
    call refuses to run until they are set (by :meth:`set_positions` or by loading a state dict).
    """

    def __init__(self, num_partitions_local: int, k_per: int, device=None):
        super().__init__()
        if num_partitions_local < 0 or k_per < 0:
            raise ValueError(f"need num_partitions_local >= 0 and k_per >= 0, got {num_partitions_local}, {k_per}")
        self.num_partitions_local = num_partitions_local
        self.k_per = k_per
        self.active = num_partitions_local > 0 and k_per > 0
        shape = (num_partitions_local, k_per)
        self.register_buffer("p_pos", torch.full(shape, -1, dtype=torch.int64, device=device))
        self.register_buffer("n_pos", torch.full(shape, -1, dtype=torch.int64, device=device))
        self._pos_max = -1  # python int: bound check without a device sync per call
        # Set where the operator spans the tensor-parallel ranks (expansion/spanning.py): positions are then
        # those of the 2k-unit virtual weight every call gathers, and each effective_* goes through it.
        self.span = None
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _refresh_pos_max(self) -> None:
        if self.p_pos.numel() == 0:
            self._pos_max = 0
        elif int(torch.minimum(self.p_pos.min(), self.n_pos.min())) < 0:
            self._pos_max = -1
        else:
            self._pos_max = int(torch.maximum(self.p_pos.max(), self.n_pos.max()))

    def set_positions(self, p_pos_local: torch.Tensor, n_pos_local: torch.Tensor) -> None:
        """Install the rank-local ``[B_local, k_per]`` positions of the P and N units (pairing by column)."""
        shape = tuple(self.p_pos.shape)
        if tuple(p_pos_local.shape) != shape or tuple(n_pos_local.shape) != shape:
            raise ValueError(f"positions must have shape {shape}, got {tuple(p_pos_local.shape)}, "
                             f"{tuple(n_pos_local.shape)}")
        both = torch.cat([p_pos_local.reshape(-1), n_pos_local.reshape(-1)]).cpu()
        if both.numel() and (int(both.min()) < 0 or torch.unique(both).numel() != both.numel()):
            raise ValueError("P and N positions must be non-negative, duplicate-free and disjoint")
        with torch.no_grad():
            self.p_pos.copy_(p_pos_local)
            self.n_pos.copy_(n_pos_local)
        self._refresh_pos_max()

    def _check_ready(self, n_local: int, what: str) -> None:
        if self._pos_max < 0:
            raise RuntimeError(f"{type(self).__name__}.{what}: positions not set; call set_positions() first")
        if self._pos_max >= n_local:
            raise ValueError(f"{type(self).__name__}.{what}: position {self._pos_max} out of range for "
                             f"{n_local} local units (wrong shard or positions not sharded?)")

    def forward(self, kind: str, w: torch.Tensor) -> torch.Tensor:
        """``kind`` in {'fc1', 'fc2', 'qkv', 'qkv_bias', 'proj'}: dispatch to ``effective_<kind>`` (for functional_call)."""
        fn = getattr(self, f"effective_{kind}", None)
        if fn is None:
            raise ValueError(f"{type(self).__name__} has no effective_{kind}")
        return fn(w)


class FFNExpansion(_ExpansionBase):
    """Operator of one SwiGLU MLP shard: one (M, alpha) shared by gate, up and fc2; beta_gate, beta_up.

    Parameters (leading dim = local partitions B_local, m = k_per):
    ``monarch_l`` [B, bs, nb, nb], ``monarch_r`` [B, nb, bs, bs], ``alpha``, ``beta_gate``, ``beta_up`` [B, m].
    With k_per == 0 the module holds no parameters and every effective_* returns its input.
    ``monarch_blocks``: nb = the divisor of m closest to it (0: closest to sqrt(m); see monarch_shape).
    """

    def __init__(self, num_partitions_local: int, k_per: int, dtype: torch.dtype = torch.float32, device=None,
                 generator: Optional[torch.Generator] = None, monarch_blocks: int = 0):
        super().__init__(num_partitions_local, k_per, device)
        if self.active:
            b, m = num_partitions_local, k_per
            lf, rf = monarch_init(b, m, None, dtype, device, monarch_blocks)
            self.monarch_l = nn.Parameter(lf)
            self.monarch_r = nn.Parameter(rf)
            self.alpha = nn.Parameter(torch.ones(b, m, dtype=dtype, device=device))
            self.beta_gate = nn.Parameter(torch.ones(b, m, dtype=dtype, device=device))
            self.beta_up = nn.Parameter(torch.ones(b, m, dtype=dtype, device=device))
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None, first_block: int = 0,
                         num_blocks: Optional[int] = None) -> None:
        """Fresh zero-M operator (L = 0, R random, alpha = beta = 1).

        R is drawn for all ``num_blocks`` partitions of the layer (default: the local ones) and the local
        slice ``[first_block, first_block + B_local)`` kept, so with the same generator state every TP
        layout gets the same operator as TP=1. The factors keep their shapes (nb = the current block count).
        """
        if not self.active:
            return
        b = self.num_partitions_local
        total = b if num_blocks is None else num_blocks
        lf, rf = monarch_init(total, self.k_per, generator, self.monarch_r.dtype, self.monarch_r.device,
                              self.monarch_l.shape[-1])
        self.monarch_l.copy_(lf[first_block:first_block + b])
        self.monarch_r.copy_(rf[first_block:first_block + b])
        for p in (self.alpha, self.beta_gate, self.beta_up):
            p.fill_(1.0)

    def effective_fc1(self, w: torch.Tensor) -> torch.Tensor:
        """``[2f_local, h]`` = [gate; up] -> W_eff (column-type on both halves, one copy of w)."""
        if self.span is not None and self.active:
            return self.span.apply("fc1", w, self._effective_fc1)
        return self._effective_fc1(w)

    def _effective_fc1(self, w: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return w
        f_loc = w.shape[0] // 2
        self._check_ready(f_loc, "effective_fc1")
        p_rows = torch.stack([self.p_pos, self.p_pos + f_loc])  # [2, B, m]: gate rows, up rows
        n_rows = torch.stack([self.n_pos, self.n_pos + f_loc])  # [2, B, m]
        betas = torch.stack([self.beta_gate, self.beta_up])  # [2, B, m]
        return expand_columns(w, p_rows, n_rows, self.monarch_l, self.monarch_r, self.alpha, betas)

    def effective_fc2(self, w: torch.Tensor) -> torch.Tensor:
        """``[h, f_local]`` -> W_eff (row-type)."""
        if self.span is not None and self.active:
            return self.span.apply("fc2", w, self._effective_fc2)
        return self._effective_fc2(w)

    def _effective_fc2(self, w: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return w
        self._check_ready(w.shape[1], "effective_fc2")
        return expand_rows(w, self.p_pos, self.n_pos, self.monarch_l, self.monarch_r, self.alpha)

    @torch.no_grad()
    def fuse_fc1(self, w: torch.Tensor) -> torch.Tensor:
        """The fused fc1 weight (no autograd), to replace W at the end of a stage."""
        return self.effective_fc1(w).detach()

    @torch.no_grad()
    def fuse_fc2(self, w: torch.Tensor) -> torch.Tensor:
        """The fused fc2 weight (no autograd)."""
        return self.effective_fc2(w).detach()

    def extra_repr(self) -> str:
        return f"num_partitions_local={self.num_partitions_local}, k_per={self.k_per}"


class AttentionExpansion(_ExpansionBase):
    """Operator of one attention shard (units = query groups; MHA: heads).

    MHA (r == 1): V side (m = k_per*d) and O side (m = k_per*r*d) have the same m and share
    ``monarch_l``, ``monarch_r``, ``alpha``; ``beta_v`` scales the P rows of V.
    GQA (r > 1): separate ``v_monarch_l``, ``v_monarch_r``, ``v_alpha`` and ``o_monarch_l``,
    ``o_monarch_r``, ``o_alpha``; plus ``beta_v``. Q and K rows are never touched by the operator.
    ``monarch_blocks`` as in :class:`FFNExpansion`, for each side's own m.
    """

    def __init__(self, num_partitions_local: int, k_per: int, d: int, r: int, dtype: torch.dtype = torch.float32,
                 device=None, generator: Optional[torch.Generator] = None, monarch_blocks: int = 0):
        super().__init__(num_partitions_local, k_per, device)
        if d <= 0 or r <= 0:
            raise ValueError(f"AttentionExpansion needs d > 0 and r > 0, got d={d}, r={r}")
        self.d, self.r = d, r
        self.shared = r == 1
        if self.active:
            b, m_v, m_o = num_partitions_local, k_per * d, k_per * r * d
            ones = lambda m: nn.Parameter(torch.ones(b, m, dtype=dtype, device=device))  # noqa: E731
            if self.shared:
                lf, rf = monarch_init(b, m_v, None, dtype, device, monarch_blocks)
                self.monarch_l, self.monarch_r, self.alpha = nn.Parameter(lf), nn.Parameter(rf), ones(m_v)
            else:
                lf, rf = monarch_init(b, m_v, None, dtype, device, monarch_blocks)
                self.v_monarch_l, self.v_monarch_r, self.v_alpha = nn.Parameter(lf), nn.Parameter(rf), ones(m_v)
                lf, rf = monarch_init(b, m_o, None, dtype, device, monarch_blocks)
                self.o_monarch_l, self.o_monarch_r, self.o_alpha = nn.Parameter(lf), nn.Parameter(rf), ones(m_o)
            self.beta_v = ones(m_v)
            self.reset_parameters(generator)

    def _v_side(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.shared:
            return self.monarch_l, self.monarch_r, self.alpha
        return self.v_monarch_l, self.v_monarch_r, self.v_alpha

    def _o_side(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.shared:
            return self.monarch_l, self.monarch_r, self.alpha
        return self.o_monarch_l, self.o_monarch_r, self.o_alpha

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None, first_block: int = 0,
                         num_blocks: Optional[int] = None) -> None:
        """Fresh zero-M operator; TP-layout independent draws as in :meth:`FFNExpansion.reset_parameters`.

        Under GQA the V side's R is drawn before the O side's. The factors keep their shapes.
        """
        if not self.active:
            return
        b = self.num_partitions_local
        total = b if num_blocks is None else num_blocks
        sl = slice(first_block, first_block + b)
        sides = [self._v_side()] if self.shared else [self._v_side(), self._o_side()]
        for lf_p, rf_p, alpha in sides:
            m = alpha.shape[1]
            lf, rf = monarch_init(total, m, generator, rf_p.dtype, rf_p.device, lf_p.shape[-1])
            lf_p.copy_(lf[sl])
            rf_p.copy_(rf[sl])
            alpha.fill_(1.0)
        self.beta_v.fill_(1.0)

    def effective_qkv(self, w: torch.Tensor) -> torch.Tensor:
        """``[ng_local*(r+2)*d, h]`` interleaved qkv -> W_eff (column-type on the V rows only)."""
        if self.span is not None and self.active:
            return self.span.apply("qkv", w, self._effective_qkv)
        return self._effective_qkv(w)

    def _effective_qkv(self, w: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return w
        d, r = self.d, self.r
        self._check_ready(w.shape[0] // ((r + 2) * d), "effective_qkv")
        p_rows = unit_rows(self.p_pos, (r + 2) * d, (r + 1) * d, d)  # [B, k_per*d]
        n_rows = unit_rows(self.n_pos, (r + 2) * d, (r + 1) * d, d)
        lf, rf, alpha = self._v_side()
        return expand_columns(w, p_rows, n_rows, lf, rf, alpha, self.beta_v)

    def effective_proj(self, w: torch.Tensor) -> torch.Tensor:
        """``[h, ng_local*r*d]`` -> W_eff (row-type on the groups' columns)."""
        if self.span is not None and self.active:
            return self.span.apply("proj", w, self._effective_proj)
        return self._effective_proj(w)

    def _effective_proj(self, w: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return w
        rd = self.r * self.d
        self._check_ready(w.shape[1] // rd, "effective_proj")
        p_cols = unit_rows(self.p_pos, rd, 0, rd)  # [B, k_per*r*d]
        n_cols = unit_rows(self.n_pos, rd, 0, rd)
        lf, rf, alpha = self._o_side()
        return expand_rows(w, p_cols, n_cols, lf, rf, alpha)

    def effective_qkv_bias(self, b: torch.Tensor) -> torch.Tensor:
        """``[ng_local*(r+2)*d]`` interleaved qkv bias -> b_eff: the bias column of the V rows, expanded with them
        (same M, alpha and beta_v as :meth:`effective_qkv`)."""
        if not self.active:
            return b
        return self.effective_qkv(b.unsqueeze(1)).squeeze(1)

    @torch.no_grad()
    def fuse_qkv(self, w: torch.Tensor) -> torch.Tensor:
        """The fused qkv weight (no autograd)."""
        return self.effective_qkv(w).detach()

    @torch.no_grad()
    def fuse_qkv_bias(self, b: torch.Tensor) -> torch.Tensor:
        """The fused qkv bias (no autograd)."""
        return self.effective_qkv_bias(b).detach()

    @torch.no_grad()
    def fuse_proj(self, w: torch.Tensor) -> torch.Tensor:
        """The fused proj weight (no autograd)."""
        return self.effective_proj(w).detach()

    def extra_repr(self) -> str:
        return f"num_partitions_local={self.num_partitions_local}, k_per={self.k_per}, d={self.d}, r={self.r}"


def shard_expansion_state(
    state: Dict[str, torch.Tensor], tp_rank: int, tp_size: int, n_units: int
) -> Dict[str, torch.Tensor]:
    """A TP=1 operator state dict -> rank ``tp_rank``'s local one.

    Every parameter has the partition axis first, so it is sliced on dim 0 to the rank's blocks
    (:func:`local_blocks`); ``p_pos``/``n_pos`` also get rebased to local positions. Used for
    TP-invariance tests and to reshard a checkpoint.
    """
    out: Dict[str, torch.Tensor] = {}
    first, count = local_blocks(state["p_pos"], tp_rank, tp_size, n_units)
    for key, t in state.items():
        if key.endswith("p_pos") or key.endswith("n_pos"):
            continue
        if count:  # a rank without a block holds no parameters (an inactive operator)
            out[key] = t[first:first + count].clone()
    p_loc, n_loc = shard_positions(state["p_pos"], state["n_pos"], tp_rank, tp_size, n_units)
    out["p_pos"], out["n_pos"] = p_loc.clone(), n_loc.clone()
    return out


def fuse_layer_weights(
    weights: Dict[str, torch.Tensor],
    ffn_op: Optional[FFNExpansion],
    attn_op: Optional[AttentionExpansion],
) -> Dict[str, torch.Tensor]:
    """Fuse a layer's operators into its (local) weights, matched by name suffix.

    ``linear_qkv.weight`` (and ``linear_qkv.bias``), ``linear_proj.weight``, ``linear_fc1.weight`` and
    ``linear_fc2.weight`` are replaced by their fused versions; every other entry (norms) is passed
    through. A None operator leaves its weights unchanged.
    """
    out = {}
    for name, w in weights.items():
        if attn_op is not None and name.endswith("linear_qkv.weight"):
            out[name] = attn_op.fuse_qkv(w)
        elif attn_op is not None and name.endswith("linear_qkv.bias"):
            out[name] = attn_op.fuse_qkv_bias(w)
        elif attn_op is not None and name.endswith("linear_proj.weight"):
            out[name] = attn_op.fuse_proj(w)
        elif ffn_op is not None and name.endswith("linear_fc1.weight"):
            out[name] = ffn_op.fuse_fc1(w)
        elif ffn_op is not None and name.endswith("linear_fc2.weight"):
            out[name] = ffn_op.fuse_fc2(w)
        else:
            out[name] = w
    return out


def monarch_sq_norms(ops: list, skip_spanning: bool = False) -> torch.Tensor:
    """float64 ``[n]``: the squared Frobenius norm of every dense Monarch matrix M of ``ops`` (one per
    FFN operator, one or two per attention operator), in order; 0 right after insertion. A rank's share:
    under TP the squares of all ranks add up to the whole matrix's (inactive operators count zeros, and
    with ``skip_spanning`` so do operators replicated over the ranks, which one rank counts)."""
    norms = []
    for op in ops:
        if not op.active or (skip_spanning and op.span is not None):  # zeros, as many as an active one has
            sides = 1 if isinstance(op, FFNExpansion) or op.shared else 2
            norms += [torch.zeros((), dtype=torch.float64)] * sides
            continue
        for name in ("monarch_l", "v_monarch_l", "o_monarch_l"):
            if hasattr(op, name):
                lf, rf = getattr(op, name), getattr(op, name.replace("_l", "_r"))
                norms.append(monarch_to_dense(lf.detach(), rf.detach()).double().square().sum())
    return torch.stack(norms).cpu() if norms else torch.zeros(0, dtype=torch.float64)


def monarch_summary(attn_op: Optional[AttentionExpansion], ffn_op: Optional[FFNExpansion]) -> str:
    """'nb x bs' of every Monarch matrix of a layer's operators, e.g. 'attn v 2x4 o 2x8, ffn 4x4' (for logs)."""
    parts = []
    for kind, op in (("attn", attn_op), ("ffn", ffn_op)):
        sides = [(side, getattr(op, f"{side}monarch_l", None)) for side in ("", "v_", "o_")] if op is not None else []
        shapes = [f"{side[:1] + ' ' if side else ''}{lf.shape[-1]}x{lf.shape[1]}" for side, lf in sides if lf is not None]
        if shapes:
            parts.append(f"{kind} {' '.join(shapes)}")
    return ", ".join(parts) or "-"


def state_shape_mismatches(module: nn.Module, state: Dict[str, torch.Tensor]) -> list:
    """'name: saved (..) vs built (..)' for every tensor of ``state`` whose shape differs from ``module``'s."""
    own = module.state_dict()
    return [f"{k}: saved {tuple(v.shape)} vs built {tuple(own[k].shape)}" for k, v in state.items()
            if k in own and tuple(v.shape) != tuple(own[k].shape)]
