"""Selected (partial) training mode: frozen base weights plus dense deltas on the tuned units.

In the released instruction-tuning setting (docs/method.md, "Two modes") base weights are frozen and only
the P, N and E units are trained directly: zero-initialised dense deltas on all their rows of Q, K, V
(the group's rows in linear_qkv, and their bias entries when the model has a QKV bias), gate and up, and
their columns of linear_proj and linear_fc2. The expansion operator then acts on W' = W + scatter(delta). Embeddings and the output layer stay trainable.
Zero deltas make the mode function-preserving at insertion, like the operator itself.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_apex.expansion.geometry import units_per_layer, unit_share

from .operator import AttentionExpansion, FFNExpansion, attn_operator_num_params, ffn_operator_num_params, unit_rows

__all__ = ["tuned_units", "local_units", "PartialDeltas", "selected_mode_trainable_fraction"]


def tuned_units(*index_sets: torch.Tensor) -> torch.Tensor:
    """Sorted union of unit index sets (e.g. P, N, E); raises if they overlap."""
    allu = torch.cat([s.reshape(-1).long() for s in index_sets])
    uniq = torch.unique(allu)  # sorted
    if uniq.numel() != allu.numel():
        raise ValueError("tuned unit sets overlap")
    return uniq


def local_units(units: torch.Tensor, tp_rank: int, tp_size: int, n_units: int) -> torch.Tensor:
    """Global unit indices -> those held by TP rank ``tp_rank``, as local indices (sorted)."""
    if n_units % tp_size:
        raise ValueError(f"n_units={n_units} not divisible by tp_size={tp_size}")
    n_loc = n_units // tp_size
    lo = tp_rank * n_loc
    keep = (units >= lo) & (units < lo + n_loc)
    return torch.sort(units[keep] - lo).values


class PartialDeltas(nn.Module):
    """Dense zero-initialised deltas on the tuned units of one layer shard.

    Args:
        attn_units: ``[u_a]`` local query-group indices to tune (all their Q, K, V rows and proj columns).
        ffn_units: ``[u_f]`` local FFN channels to tune (gate row, up row, fc2 column).
        h: hidden size; d: head dim; r: heads per group.
        qkv_bias: the model has a bias on Q, K and V (``model.add_qkv_bias``): its entries of the tuned rows get
            a delta too.

    Parameters: ``qkv_delta`` [u_a*(r+2)*d, h], ``proj_delta`` [h, u_a*r*d], ``gate_delta``/``up_delta``
    [u_f, h], ``fc2_delta`` [h, u_f]; with ``qkv_bias`` also ``qkv_bias_delta`` [u_a*(r+2)*d]. Rows of
    qkv_delta follow the units' own interleaved layout (q rows, k rows, v rows per group), unit order
    ascending.
    """

    def __init__(self, attn_units: torch.Tensor, ffn_units: torch.Tensor, h: int, d: int, r: int,
                 dtype: torch.dtype = torch.float32, device=None, qkv_bias: bool = False):
        super().__init__()
        self.h, self.d, self.r = h, d, r
        attn_units = torch.as_tensor(attn_units, dtype=torch.int64).reshape(-1)
        ffn_units = torch.as_tensor(ffn_units, dtype=torch.int64).reshape(-1)
        for name, u in (("attn_units", attn_units), ("ffn_units", ffn_units)):
            if u.numel() and (int(u.min()) < 0 or torch.unique(u).numel() != u.numel()):
                raise ValueError(f"{name} must be non-negative and duplicate-free")
        self.register_buffer("attn_units", torch.sort(attn_units).values.to(device))
        self.register_buffer("ffn_units", torch.sort(ffn_units).values.to(device))
        ua, uf = attn_units.numel(), ffn_units.numel()
        z = lambda *s: nn.Parameter(torch.zeros(*s, dtype=dtype, device=device))  # noqa: E731
        self.qkv_delta = z(ua * (r + 2) * d, h)
        self.proj_delta = z(h, ua * r * d)
        self.gate_delta = z(uf, h)
        self.up_delta = z(uf, h)
        self.fc2_delta = z(h, uf)
        self.qkv_bias_delta = z(ua * (r + 2) * d) if qkv_bias else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero every delta (a fresh, function-preserving start)."""
        for p in self.parameters():
            p.zero_()

    def _check(self, units: torch.Tensor, n_local: int, what: str) -> None:
        if units.numel() and int(units.max()) >= n_local:
            raise ValueError(f"PartialDeltas.{what}: unit {int(units.max())} out of range for {n_local} local units")

    def effective_qkv(self, w: torch.Tensor, expansion: Optional[AttentionExpansion] = None) -> torch.Tensor:
        """W' = W + scatter(qkv_delta) on the tuned groups' rows, then the expansion operator if given."""
        per = (self.r + 2) * self.d
        self._check(self.attn_units, w.shape[0] // per, "effective_qkv")
        rows = unit_rows(self.attn_units.unsqueeze(0), per, 0, per).reshape(-1)  # [u_a*(r+2)*d]
        out = w.index_add(0, rows, self.qkv_delta.to(w.dtype))
        return out if expansion is None else expansion.effective_qkv(out)

    def effective_qkv_bias(self, b: torch.Tensor, expansion: Optional[AttentionExpansion] = None) -> torch.Tensor:
        """b' = b + scatter(qkv_bias_delta) on the tuned groups' entries, then the expansion operator if given."""
        if self.qkv_bias_delta is None:
            raise ValueError("PartialDeltas.effective_qkv_bias: built without qkv_bias (the model has no QKV bias)")
        per = (self.r + 2) * self.d
        self._check(self.attn_units, b.shape[0] // per, "effective_qkv_bias")
        rows = unit_rows(self.attn_units.unsqueeze(0), per, 0, per).reshape(-1)  # [u_a*(r+2)*d]
        out = b.index_add(0, rows, self.qkv_bias_delta.to(b.dtype))
        return out if expansion is None else expansion.effective_qkv_bias(out)

    def effective_proj(self, w: torch.Tensor, expansion: Optional[AttentionExpansion] = None) -> torch.Tensor:
        """W' = W + scatter(proj_delta) on the tuned groups' columns, then the operator if given."""
        rd = self.r * self.d
        self._check(self.attn_units, w.shape[1] // rd, "effective_proj")
        cols = unit_rows(self.attn_units.unsqueeze(0), rd, 0, rd).reshape(-1)  # [u_a*r*d]
        out = w.index_add(1, cols, self.proj_delta.to(w.dtype))
        return out if expansion is None else expansion.effective_proj(out)

    def effective_fc1(self, w: torch.Tensor, expansion: Optional[FFNExpansion] = None) -> torch.Tensor:
        """W' = W + scatter([gate_delta; up_delta]) on the tuned channels' rows of both halves."""
        f_loc = w.shape[0] // 2
        self._check(self.ffn_units, f_loc, "effective_fc1")
        rows = torch.cat([self.ffn_units, self.ffn_units + f_loc])  # [2*u_f]
        delta = torch.cat([self.gate_delta, self.up_delta]).to(w.dtype)  # [2*u_f, h]
        out = w.index_add(0, rows, delta)
        return out if expansion is None else expansion.effective_fc1(out)

    def effective_fc2(self, w: torch.Tensor, expansion: Optional[FFNExpansion] = None) -> torch.Tensor:
        """W' = W + scatter(fc2_delta) on the tuned channels' columns, then the operator if given."""
        self._check(self.ffn_units, w.shape[1], "effective_fc2")
        out = w.index_add(1, self.ffn_units, self.fc2_delta.to(w.dtype))
        return out if expansion is None else expansion.effective_fc2(out)

    def forward(self, kind: str, w: torch.Tensor) -> torch.Tensor:
        """Dispatch to ``effective_<kind>`` without an operator (for torch.func.functional_call)."""
        return getattr(self, f"effective_{kind}")(w)

    @torch.no_grad()
    def fuse_qkv(self, w, expansion=None):
        """Fused qkv weight (no autograd)."""
        return self.effective_qkv(w, expansion).detach()

    @torch.no_grad()
    def fuse_qkv_bias(self, b, expansion=None):
        """Fused qkv bias (no autograd)."""
        return self.effective_qkv_bias(b, expansion).detach()

    @torch.no_grad()
    def fuse_proj(self, w, expansion=None):
        """Fused proj weight (no autograd)."""
        return self.effective_proj(w, expansion).detach()

    @torch.no_grad()
    def fuse_fc1(self, w, expansion=None):
        """Fused fc1 weight (no autograd)."""
        return self.effective_fc1(w, expansion).detach()

    @torch.no_grad()
    def fuse_fc2(self, w, expansion=None):
        """Fused fc2 weight (no autograd)."""
        return self.effective_fc2(w, expansion).detach()


def selected_mode_trainable_fraction(
    h: int, f: int, nh: int, ng: int, d: int, L: int, vocab: int, tied: bool,
    k_frac: float, attn_tuned_frac: float, ffn_tuned_frac: float, b_cfg: int = 1, qkv_bias: bool = False,
) -> float:
    """Share of the model's parameters trained in selected mode.

    Numerator: deltas on the tuned units (floor(frac * units) query groups with all their Q/K/V rows and
    O columns; FFN channels with gate row, up row and down column), the operator parameters (k =
    floor(k_frac * units) in B = gcd(b_cfg, units, k) partitions; b_cfg=1 is the paper's
    unpartitioned operator), embeddings and output layer. Norms are frozen. Denominator: the plain
    model's parameter count (norms included; the transient operator parameters are not part of it).
    ``qkv_bias``: the model has a QKV bias (one entry per QKV row, with a delta on the tuned rows' entries).
    """
    r = nh // ng
    attn_layer = (nh + 2 * ng) * d * (h + int(qkv_bias)) + h * nh * d
    ffn_layer = 3 * f * h
    emb = vocab * h * (1 if tied else 2)
    total = L * (attn_layer + ffn_layer + 2 * h) + h + emb
    ua, uf = unit_share(attn_tuned_frac, ng), unit_share(ffn_tuned_frac, f)
    deltas = ua * ((r + 2) * d * (h + int(qkv_bias)) + h * r * d) + uf * 3 * h
    (ka, b_a), (kf, b_f) = units_per_layer(k_frac, ng, b_cfg), units_per_layer(k_frac, f, b_cfg)
    ka_per, kf_per = ka // b_a, kf // b_f
    op_ffn = ffn_operator_num_params(b_f, kf_per)
    op_attn = attn_operator_num_params(b_a, ka_per, d, r)
    trainable = L * (deltas + op_ffn + op_attn) + emb
    return trainable / total
