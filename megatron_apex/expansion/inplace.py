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
engine packs the units at every boundary (P units first, N units next, in every partition), so the P
and N rows are strided blocks of each weight; other positions (set by hand, as in tests) go through
index gathers and scatters, with the same results. The cost per step is a few passes over the P and N rows plus one small Monarch forward and backward
per operator, whatever the number of micro-batches or tokens. The engine falls back to building
W_eff per call for the ``selected`` mode (frozen base weights have no gradient buffer) and with
overlapped gradient reduction; a test checks that both paths agree.
"""

from __future__ import annotations

import logging

import torch

from megatron_apex.expansion.monarch import monarch_backward, monarch_forward, monarch_right
from megatron_apex.expansion.operator import unit_rows
from megatron_apex.expansion.partition import packed_positions

logger = logging.getLogger(__name__)


class _Segment:
    """The P and N slices of one weight under one operator, read and written together.

    ``p_idx``/``n_idx`` are ``[B, m]`` row (or column) indices; ``pn`` is their concatenation, so one
    ``index_select`` reads, and one ``index_copy_`` writes, both sets as a ``[2, B, m, c]`` tensor
    (``[0]`` = P, ``[1]`` = N). Columns of a row-type weight are transposed into rows.
    """

    def __init__(self, kind: str, dim: int, p_idx: torch.Tensor, n_idx: torch.Tensor, beta):
        self.kind, self.dim, self.beta = kind, dim, beta
        self.shape = (2, *p_idx.shape)  # [2, B, m]
        self.pn = torch.cat([p_idx.reshape(-1), n_idx.reshape(-1)])
        self.n = n_idx.reshape(-1)

    def read(self, t: torch.Tensor) -> torch.Tensor:
        """P and N rows of ``t`` -> ``[2, B, m, c]`` (a fresh tensor)."""
        x = t.index_select(self.dim, self.pn)
        if self.dim == 1:
            x = x.t()
        return x.reshape(*self.shape, -1)

    def write(self, t: torch.Tensor, x: torch.Tensor) -> None:
        """``x`` ``[2, B, m, c]`` into the P and N rows of ``t``; ``[B, m, c]`` into the N rows only."""
        idx = self.pn if x.dim() == 4 else self.n
        x = x.reshape(idx.numel(), -1).to(t.dtype)
        t.index_copy_(self.dim, idx, x.t() if self.dim == 1 else x)


class _PackedSegment:
    """The same interface as :class:`_Segment` when the units are *packed* (partition.pack_partitions):
    in every partition the P units come first and the N units right after them, so P and N are strided
    views of the weight and reading or writing them touches only their own memory (a gather of
    scattered columns touches every cache line of the matrix).

    The weight holds ``n_units`` units of ``unit`` rows (columns) along ``dim``, from row ``start`` on
    (the up half of fc1 starts at f_local), in ``B`` partitions; the operator uses the
    ``[offset, offset + size)`` slice of each unit (V rows of a query group: offset (r+1)*d, size d).
    """

    def __init__(self, kind: str, dim: int, num_parts: int, k: int, n_units: int, unit: int, offset: int,
                 size: int, beta, start: int = 0):
        self.kind, self.dim, self.beta = kind, dim, beta
        self.b, self.k, self.n_units, self.unit = num_parts, k, n_units, unit
        self.offset, self.size, self.start = offset, size, start

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        """``[2, B, k, size, c]`` view of the P ([0]) and N ([1]) slices of ``t``."""
        sl = slice(self.offset, self.offset + self.size)
        if self.dim == 0:
            units = t.narrow(0, self.start, self.n_units * self.unit).view(self.b, -1, self.unit, t.shape[1])
            return units[:, :2 * self.k, sl].unflatten(1, (2, self.k)).transpose(0, 1)
        units = t.narrow(1, self.start, self.n_units * self.unit).view(t.shape[0], self.b, -1, self.unit)
        return units[:, :, :2 * self.k, sl].unflatten(2, (2, self.k)).permute(2, 1, 3, 4, 0)

    def read(self, t: torch.Tensor) -> torch.Tensor:
        """A fresh ``[2, B, m, c]`` copy (never a view of ``t``, even where the slices are contiguous)."""
        v = self._view(t).clone(memory_format=torch.contiguous_format)
        return v.view(2, self.b, self.k * self.size, -1)

    def write(self, t: torch.Tensor, x: torch.Tensor) -> None:
        v = self._view(t)
        if x.dim() == 3:
            v = v[1]
        v.copy_(x.reshape(v.shape))


def _packed(op, n_local: int) -> bool:
    """Whether the operator's local positions are packed: P at ``[0, k)``, N at ``[k, 2k)`` of every partition."""
    b, k = op.p_pos.shape
    if n_local % b:
        return False
    p_pos, n_pos = packed_positions(b, k, n_local, op.p_pos.device)
    return torch.equal(op.p_pos, p_pos) and torch.equal(op.n_pos, n_pos)


class _Group:
    """Segments sharing one Monarch matrix and one alpha."""

    def __init__(self, lf, rf, alpha, segments: list):
        self.lf, self.rf, self.alpha, self.segments = lf, rf, alpha, segments
        self.ct = torch.promote_types(rf.dtype, torch.float32)  # compute dtype: fp32 at least
        self.widths = None
        self.saved = None  # the original P and N rows of every segment, in the weight's own dtype

    @torch.no_grad()
    def materialize(self, linears) -> None:
        raws = [s.read(linears[s.kind].weight.data) for s in self.segments]  # [2, B, m, c], kept to restore
        xs = [x.to(self.ct) for x in raws]
        self.widths = [x.shape[-1] for x in xs]
        xp = torch.cat([x[0] for x in xs], dim=-1)  # [B, m, C]
        mixed = monarch_forward(self.lf.to(self.ct), self.rf.to(self.ct), xp)[0].split(self.widths, dim=-1)
        alpha = self.alpha.to(self.ct).unsqueeze(-1)
        for s, x, mix in zip(self.segments, xs, mixed):
            w = linears[s.kind].weight.data
            if s.beta is None:
                s.write(w, mix.addcmul_(alpha, x[1]))  # W_eff[N] = alpha * W[N] + M W[P]
            else:
                out = torch.empty_like(x)
                torch.mul(s.beta.to(self.ct).unsqueeze(-1), x[0], out=out[0])  # W_eff[P] = beta * W[P]
                torch.addcmul(mix, alpha, x[1], out=out[1])
                s.write(w, out)
        self.saved = raws

    @torch.no_grad()
    def restore(self, linears, with_grads: bool, keep: bool = False) -> None:
        """Original rows back (bit for bit); ``keep`` leaves them referenced (CUDA graphs reuse them)."""
        if with_grads:
            self._chain_rule(linears, self.saved)
        for s, x in zip(self.segments, self.saved):
            s.write(linears[s.kind].weight.data, x)
        if not keep:
            self.saved = None

    def _chain_rule(self, linears, raws: list) -> None:
        """dL/dW on the P and N rows of main_grad, and the operator's gradients, in closed form.

        With u = L (R x_P) (Monarch, see monarch.py) and g = dL/dW_eff: dL/dW[N] = alpha * g[N],
        dL/dW[P] = beta * g[P] + M^T g[N], dL/dalpha = sum(g[N] * W[N]), dL/dbeta = sum(g[P] * W[P]).
        The Monarch intermediate R x_P is recomputed (one small bmm) rather than kept through the step.
        """
        xs = [x.to(self.ct) for x in raws]
        xp = torch.cat([x[0] for x in xs], dim=-1)  # [B, m, C]
        lf, rf = self.lf.to(self.ct), self.rf.to(self.ct)
        gs = [s.read(linears[s.kind].weight.main_grad).to(self.ct) for s in self.segments]  # [2, B, m, c]
        gn = torch.cat([g[1] for g in gs], dim=-1)  # [B, m, C] = dL/du
        d_lf, d_rf, d_x = monarch_backward(lf, rf, xp, monarch_right(rf, xp), gn)
        alpha = self.alpha.to(self.ct).unsqueeze(-1)
        d_alpha = 0
        for s, x, g, d_mix in zip(self.segments, xs, gs, d_x.split(self.widths, dim=-1)):
            d_alpha = d_alpha + torch.linalg.vecdot(g[1], x[1])
            if s.beta is not None:
                _accumulate(s.beta, torch.linalg.vecdot(g[0], x[0]))
                g[0].mul_(s.beta.to(self.ct).unsqueeze(-1))
            g[0].add_(d_mix)  # dL/dW[P]
            g[1].mul_(alpha)  # dL/dW[N]
            s.write(linears[s.kind].weight.main_grad, g)
        _accumulate(self.alpha, d_alpha)
        _accumulate(self.lf, d_lf)
        _accumulate(self.rf, d_rf)


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    """Add into ``param.grad`` in place (a CUDA graph replays into the same buffer), or set it."""
    if param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad.add_(grad)


class InPlaceLayer:
    """Materialize / restore the operators of one layer shard (see the module docstring)."""

    def __init__(self, linears: dict, attn_op, ffn_op, d: int, r: int):
        self.linears = linears
        self.groups = []
        if attn_op is not None and attn_op.active:
            b, k = attn_op.p_pos.shape
            ng_local = linears["qkv"].weight.shape[0] // ((r + 2) * d)
            if _packed(attn_op, ng_local):
                v = _PackedSegment("qkv", 0, b, k, ng_local, (r + 2) * d, (r + 1) * d, d, attn_op.beta_v)
                o = _PackedSegment("proj", 1, b, k, ng_local, r * d, 0, r * d, None)
            else:
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
            b, k = ffn_op.p_pos.shape
            p, n = ffn_op.p_pos, ffn_op.n_pos
            if _packed(ffn_op, f_local):
                segments = [_PackedSegment("fc1", 0, b, k, f_local, 1, 0, 1, ffn_op.beta_gate),
                            _PackedSegment("fc1", 0, b, k, f_local, 1, 0, 1, ffn_op.beta_up, start=f_local),
                            _PackedSegment("fc2", 1, b, k, f_local, 1, 0, 1, None)]
            else:
                segments = [_Segment("fc1", 0, p, n, ffn_op.beta_gate),
                            _Segment("fc1", 0, p + f_local, n + f_local, ffn_op.beta_up),
                            _Segment("fc2", 1, p, n, None)]
            self.groups.append(_Group(ffn_op.monarch_l, ffn_op.monarch_r, ffn_op.alpha, segments))
        self.packed = all(isinstance(s, _PackedSegment) for g in self.groups for s in g.segments)
        self.materialized = False

    def materialize(self) -> None:
        """Write the W_eff rows into the weights (keeping the originals)."""
        if self.materialized:
            return
        for group in self.groups:
            group.materialize(self.linears)
        self.materialized = True

    def restore(self, with_grads: bool, keep: bool = False) -> None:
        """Put the original rows back; with ``with_grads``, turn main_grad's dL/dW_eff rows into dL/dW
        rows and accumulate the operator's gradients."""
        if not self.materialized:
            return
        for group in self.groups:
            group.restore(self.linears, with_grads, keep)
        self.materialized = False

    def operator_params(self) -> list:
        """The operator parameters this layer's chain rule writes gradients into."""
        out = []
        for g in self.groups:
            out += [g.lf, g.rf, g.alpha] + [s.beta for s in g.segments if s.beta is not None]
        return list({id(p): p for p in out}.values())


class InPlaceRunner:
    """Materialize / restore of all local layers, once per step; replayed from two CUDA graphs on a GPU.

    The per-step work is a few dozen small kernels per layer whose launch cost (host time) is the whole
    cost of the operator on a GPU. It reads and writes only persistent tensors (weights, ``main_grad``,
    operator parameters and their gradients, the saved rows), so after one eager step with a new set of
    operators the runner captures ``materialize`` and ``restore(with_grads=True)`` of every layer as two
    graphs (sharing one memory pool) and replays them in later steps: two launches per step. The saved
    rows are then graph-owned buffers, kept for the stage. Any failure to capture falls back to eager
    execution for the rest of the run, with a warning. Forward-only passes (evaluation) replay the
    materialize graph and restore eagerly.
    """

    def __init__(self, use_graphs: bool):
        self.use_graphs = use_graphs
        self.replays = 0  # steps whose chain rule ran from the graph (for tests and benchmarks)
        self._key = None
        self._reset()

    def _reset(self) -> None:
        self._eager_steps = 0
        self._g_mat = self._g_res = None
        self._stream = None

    def release(self) -> None:
        """Drop the graphs and the buffers they own (at a boundary and at the final fuse)."""
        self._key = None
        self._reset()

    def _check(self, layers: list) -> None:
        # The key holds the layers themselves (compared by identity), so a new layer can never pass for a
        # freed one.
        if self._key != layers:
            self._key = list(layers)  # new operators (a boundary, a restore): new graphs after one eager step
            self._reset()

    def _graphs_on(self, layers: list) -> bool:
        return (self.use_graphs and torch.cuda.is_available() and any(layer.groups for layer in layers)
                and layers[0].linears["qkv"].weight.is_cuda)

    @staticmethod
    def _warn(exc: Exception) -> None:
        logger.warning("APEX: CUDA graph capture of the operator failed (%s: %s); running "
                                            "it eagerly from now on (apex.cuda_graphs=false avoids the attempt)",
                                            type(exc).__name__, exc)

    def _fall_back(self, layers: list, exc: Exception) -> None:
        """A failed materialize capture: nothing captured ran, so the weights are the originals (the
        rows the capture left in ``saved`` were never written and are dropped)."""
        self._warn(exc)
        self.use_graphs = False
        self._reset()
        for layer in layers:
            layer.materialized = False
            for g in layer.groups:
                g.saved = None

    def materialize(self, layers: list) -> None:
        self._check(layers)
        if not layers or layers[0].materialized:
            return
        if self._graphs_on(layers) and self._eager_steps >= 1:
            if self._g_mat is None:
                self._stream = torch.cuda.Stream()
                self._stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self._stream):  # warm up on the capture stream: no net change
                    for layer in layers:
                        layer.materialize()
                    for layer in layers:
                        layer.restore(with_grads=False)
                torch.cuda.current_stream().wait_stream(self._stream)
                try:
                    g = torch.cuda.CUDAGraph()
                    # The outer stream context puts the current stream back even if ending a failed
                    # capture raises on the way out of the inner one.
                    with torch.cuda.stream(self._stream):
                        with torch.cuda.graph(g, stream=self._stream, capture_error_mode="thread_local"):
                            for layer in layers:
                                layer.materialize()
                    self._g_mat = g  # the groups' saved rows are now its buffers, kept (restore keep=True)
                except RuntimeError as exc:
                    self._fall_back(layers, exc)
            if self._g_mat is not None:
                self._g_mat.replay()
                for layer in layers:
                    layer.materialized = True
                return
        for layer in layers:
            layer.materialize()

    def restore(self, layers: list, with_grads: bool) -> None:
        self._check(layers)
        if not layers or not layers[0].materialized:
            return
        params = [p for layer in layers for p in layer.operator_params()] if with_grads else []
        graphed = self.use_graphs and self._g_mat is not None
        if with_grads and graphed:
            try:
                if self._g_res is None:
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.stream(self._stream):  # see materialize
                        with torch.cuda.graph(g, pool=self._g_mat.pool(), stream=self._stream,
                                              capture_error_mode="thread_local"):
                            torch._foreach_zero_([p.grad for p in params])
                            for layer in layers:
                                layer.restore(with_grads=True, keep=True)
                    self._g_res = g
                self._g_res.replay()
                self.replays += 1
                for layer in layers:
                    layer.materialized = False
                return
            except RuntimeError as exc:  # nothing captured ran: the rows are still W_eff, the saved rows intact
                self._warn(exc)
                self.use_graphs = graphed = False
                for layer in layers:
                    layer.materialized = True
        for p in params:
            p.grad = None
        for layer in layers:
            layer.restore(with_grads, keep=graphed)
        if with_grads:
            self._eager_steps += 1
        if not self.use_graphs and self._g_mat is not None:
            self._reset()
