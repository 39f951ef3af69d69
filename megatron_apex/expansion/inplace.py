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
linear_fc2) are handled as their transposed columns, where the same formula holds without beta. A QKV
bias is one more segment of the V rows' group: its entries are a ``[rows, 1]`` column, expanded (and
differentiated) with the rows.
Weights sharing one (M, alpha) are expanded by one Monarch call on their concatenated columns. The
engine packs the units at every boundary (P units first, N units next, in every partition), so the P
and N rows are strided blocks of each weight; other positions (set by hand, as in tests) go through
index gathers and scatters, with the same results. Operators of equal shape in several layers (the
same unit kind in every layer of a model) are computed together (:class:`_Batch`). The cost per step
is a few passes over the P and N rows plus one small Monarch forward and backward per batch of
layers, whatever the number of micro-batches or tokens. The engine falls back to building
W_eff per call for the ``selected`` mode (frozen base weights have no gradient buffer) and for an
operator that spans the tensor-parallel ranks (spanning.py); a test checks that both paths agree.

With overlapped gradient reduction megatron-core starts reducing a bucket as soon as the gradients of
its parameters are complete, during the backward pass: :class:`GradReadyGate` holds back the "ready"
signal of every expanded weight until all weights of its batch are complete, runs that batch's chain
rule and restore, and only then passes the signals on, so no bucket is reduced before its rows are
dL/dW.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from megatron_apex.expansion.monarch import monarch_backward, monarch_forward, monarch_right
from megatron_apex.expansion.operator import unit_rows
from megatron_apex.expansion.partition import packed_positions

logger = logging.getLogger(__name__)


class _Segment:
    """The P and N slices of one weight under one operator, read and written together.

    ``p_idx``/``n_idx`` are ``[B, m]`` row (or column) indices; one ``index_select`` reads, and one
    ``index_copy_`` writes, both sets as a ``[2, B, m, c]`` tensor (``[0]`` = P, ``[1]`` = N). Columns
    of a row-type weight are transposed into rows.
    """

    def __init__(self, kind: str, dim: int, p_idx: torch.Tensor, n_idx: torch.Tensor, beta, attr: str = "weight"):
        self.kind, self.dim, self.beta, self.attr = kind, dim, beta, attr
        self.idx = (p_idx.reshape(-1), n_idx.reshape(-1), torch.cat([p_idx.reshape(-1), n_idx.reshape(-1)]))

    def tensor(self, linears: dict, grad: bool = False) -> torch.Tensor:
        """The tensor this segment reads and writes (its linear's weight or bias, or their ``main_grad``)."""
        return _tensor(linears[self.kind], self.attr, grad)

    def read_into(self, t: torch.Tensor, out: torch.Tensor) -> None:
        """P and N rows of ``t`` into ``out`` ``[2, B, m, c]`` (any strides and dtype)."""
        x = t.index_select(self.dim, self.idx[2])
        out.copy_((x.t() if self.dim == 1 else x).reshape(out.shape))

    def write(self, t: torch.Tensor, x: torch.Tensor, half: Optional[int] = None) -> None:
        """``x`` ``[2, B, m, c]`` into the P and N rows of ``t``, or ``[B, m, c]`` into the P (``half``
        0) or N (1) rows only."""
        idx = self.idx[2 if half is None else half]
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
                 size: int, beta, start: int = 0, attr: str = "weight"):
        self.kind, self.dim, self.beta, self.attr = kind, dim, beta, attr
        self.b, self.k, self.n_units, self.unit = num_parts, k, n_units, unit
        self.offset, self.size, self.start = offset, size, start

    tensor = _Segment.tensor  # the same weight-or-bias look-up

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        """``[2, B, k, size, c]`` view of the P ([0]) and N ([1]) slices of ``t``."""
        sl = slice(self.offset, self.offset + self.size)
        if self.dim == 0:
            units = t.narrow(0, self.start, self.n_units * self.unit).view(self.b, -1, self.unit, t.shape[1])
            return units[:, :2 * self.k, sl].unflatten(1, (2, self.k)).transpose(0, 1)
        units = t.narrow(1, self.start, self.n_units * self.unit).view(t.shape[0], self.b, -1, self.unit)
        return units[:, :, :2 * self.k, sl].unflatten(2, (2, self.k)).permute(2, 1, 3, 4, 0)

    def read_into(self, t: torch.Tensor, out: torch.Tensor) -> None:
        out.unflatten(-2, (self.k, self.size)).copy_(self._view(t))

    def write(self, t: torch.Tensor, x: torch.Tensor, half: Optional[int] = None) -> None:
        v = self._view(t)
        v = v if half is None else v[half]
        v.copy_(x.unflatten(-2, (self.k, self.size)))


def linear_bias(linear) -> Optional[torch.Tensor]:
    """A linear's bias parameter, or None when it has none (megatron-core's local linears hold None there;
    Transformer Engine's may hold an empty tensor)."""
    bias = getattr(linear, "bias", None)
    return bias if isinstance(bias, torch.nn.Parameter) and bias.numel() > 0 else None


def _tensor(linear, attr: str, grad: bool) -> torch.Tensor:
    """A linear's ``weight`` or ``bias`` data (``grad``: its ``main_grad``) as a matrix: a bias ``[rows]`` is the
    ``[rows, 1]`` column it adds to the weight's rows (a view: writes reach the bias)."""
    param = getattr(linear, attr)
    t = param.main_grad if grad else param.data
    return t.unsqueeze(1) if t.dim() == 1 else t


def _packed(op, n_local: int) -> bool:
    """Whether the operator's local positions are packed: P at ``[0, k)``, N at ``[k, 2k)`` of every partition."""
    b, k = op.p_pos.shape
    if n_local % b:
        return False
    p_pos, n_pos = packed_positions(b, k, n_local, op.p_pos.device)
    return torch.equal(op.p_pos, p_pos) and torch.equal(op.n_pos, n_pos)


class _Group:
    """Segments of one layer's weights sharing one Monarch matrix and one alpha."""

    def __init__(self, linears: dict, lf, rf, alpha, segments: list):
        self.linears, self.lf, self.rf, self.alpha, self.segments = linears, lf, rf, alpha, segments
        self.ct = torch.promote_types(rf.dtype, torch.float32)  # compute dtype: fp32 at least
        w = segments[0].tensor(linears)
        dtypes = {s.tensor(linears).dtype for s in segments}
        if len(dtypes) > 1:  # the saved rows share one buffer, which must hold every segment exactly
            raise ValueError(f"APEX operator: the weights {[s.kind for s in segments]} sharing one operator have "
                             f"different dtypes {sorted(map(str, dtypes))}")
        self.widths = [s.tensor(linears).shape[1 - s.dim] for s in segments]  # c of every segment
        # Groups with equal keys (the same operator in layers of one shape) are computed together.
        self.key = (tuple((type(s), s.kind, s.attr, s.dim, s.beta is None) for s in segments), tuple(self.widths),
                    tuple(lf.shape), tuple(rf.shape), tuple(alpha.shape), rf.dtype, w.dtype, w.device)

    def operator_params(self) -> list:
        """The operator parameters this group's chain rule writes gradients into."""
        return [self.lf, self.rf, self.alpha] + [s.beta for s in self.segments if s.beta is not None]

    def work_bytes(self) -> int:
        """Size of this group's P and N rows in the compute dtype (``[2, B, m, C]``)."""
        return 2 * self.alpha.numel() * sum(self.widths) * self.ct.itemsize


class _Batch:
    """Groups of equal shape (one operator kind in several layers), computed together.

    The P and N rows of all its groups are read into one ``[2, n, B, m, C]`` tensor (C: the
    segments' widths side by side), so the arithmetic of a step is a fixed handful of kernels per
    batch, whatever the number of layers; only the reads and writes of weight and ``main_grad`` rows
    are per group and segment. ``saved`` keeps the original rows (in the weights' dtype) from
    materialize to restore.
    """

    def __init__(self, groups: list):
        self.groups = groups
        g0 = groups[0]
        self.ct = g0.ct
        self.cols, c = [], 0
        for w in g0.widths:
            self.cols.append(slice(c, c + w))
            c += w
        self.betas = [j for j, s in enumerate(g0.segments) if s.beta is not None]
        self.saved = None

    def _stack(self, tensors: list) -> torch.Tensor:
        return torch.stack(tensors).to(self.ct)

    def _monarch(self):
        """Stacked factors ``[n*B, ...]`` and alpha ``[n, B, m, 1]`` of all groups, in the compute dtype."""
        lf = self._stack([g.lf for g in self.groups])
        rf = self._stack([g.rf for g in self.groups])
        alpha = self._stack([g.alpha for g in self.groups]).unsqueeze(-1)
        return lf.flatten(0, 1), rf.flatten(0, 1), alpha

    def _beta(self, j: int) -> torch.Tensor:
        return self._stack([g.segments[j].beta for g in self.groups]).unsqueeze(-1)  # [n, B, m, 1]

    def _rows(self, grad: bool) -> torch.Tensor:
        """The P and N rows of every group: ``[2, n, B, m, C]``, of the weights (``grad``: of their main_grad)."""
        g0 = self.groups[0]
        b, m = g0.alpha.shape
        t0 = g0.segments[0].tensor(g0.linears, grad)
        out = torch.empty(2, len(self.groups), b, m, self.cols[-1].stop, dtype=t0.dtype, device=t0.device)
        for i, g in enumerate(self.groups):
            for s, cols in zip(g.segments, self.cols):
                s.read_into(s.tensor(g.linears, grad), out[:, i, ..., cols])
        return out

    @torch.no_grad()
    def materialize(self) -> None:
        """W_eff[N] = alpha * W[N] + M W[P] and W_eff[P] = beta * W[P] into the weights."""
        saved = self._rows(grad=False)  # [2, n, B, m, C]
        n, b, m, c = saved.shape[1:]
        xp = saved[0].to(self.ct)  # [n, B, m, C]
        lf, rf, alpha = self._monarch()
        mixed = monarch_forward(lf, rf, xp.view(n * b, m, c))[0].view(n, b, m, c)
        mixed.addcmul_(alpha, saved[1])
        scaled = {j: xp[..., self.cols[j]] * self._beta(j) for j in self.betas}
        for i, g in enumerate(self.groups):
            for j, (s, cols) in enumerate(zip(g.segments, self.cols)):
                w = s.tensor(g.linears)
                s.write(w, mixed[i, ..., cols], half=1)
                if j in scaled:
                    s.write(w, scaled[j][i], half=0)
        self.saved = saved

    @torch.no_grad()
    def restore(self, with_grads: bool, keep: bool = False) -> None:
        """Original rows back (bit for bit); ``keep`` leaves them referenced (CUDA graphs reuse them)."""
        if with_grads:
            self._chain_rule()
        for i, g in enumerate(self.groups):
            for s, cols in zip(g.segments, self.cols):  # P rows changed only where beta scales them
                w = s.tensor(g.linears)
                if s.beta is None:
                    s.write(w, self.saved[1, i, ..., cols], half=1)
                else:
                    s.write(w, self.saved[:, i, ..., cols])
        if not keep:
            self.saved = None

    def _chain_rule(self) -> None:
        """dL/dW on the P and N rows of main_grad, and the operator's gradients, in closed form.

        With u = L (R x_P) (Monarch, see monarch.py) and g = dL/dW_eff: dL/dW[N] = alpha * g[N],
        dL/dW[P] = beta * g[P] + M^T g[N], dL/dalpha = sum(g[N] * W[N]), dL/dbeta = sum(g[P] * W[P]).
        The Monarch intermediate R x_P is recomputed (one small bmm) rather than kept through the step.
        """
        x = self.saved.to(self.ct)  # [2, n, B, m, C]
        grad = self._rows(grad=True).to(self.ct)  # dL/dW_eff rows
        n, b, m, c = x.shape[1:]
        lf, rf, alpha = self._monarch()
        xp = x[0].view(n * b, m, c)
        d_lf, d_rf, d_x = monarch_backward(lf, rf, xp, monarch_right(rf, xp), grad[1].view(n * b, m, c))
        grads = [(lambda g: g.lf, d_lf.view(n, *self.groups[0].lf.shape)),
                 (lambda g: g.rf, d_rf.view(n, *self.groups[0].rf.shape)),
                 (lambda g: g.alpha, torch.linalg.vecdot(grad[1], x[1]))]
        for j in self.betas:
            cols = self.cols[j]
            grads.append((lambda g, j=j: g.segments[j].beta, torch.linalg.vecdot(grad[0, ..., cols], x[0, ..., cols])))
            grad[0, ..., cols] *= self._beta(j)
        grad[0] += d_x.view(n, b, m, c)  # dL/dW[P]
        grad[1] *= alpha  # dL/dW[N]
        for i, g in enumerate(self.groups):
            for s, cols in zip(g.segments, self.cols):
                s.write(s.tensor(g.linears, grad=True), grad[:, i, ..., cols])
        for param_of, d in grads:
            _accumulate([param_of(g) for g in self.groups], d)


def _accumulate(params: list, grads: torch.Tensor) -> None:
    """Add ``grads[i]`` into ``params[i].grad`` in place (a CUDA graph replays into the same buffers),
    or set it."""
    if all(p.grad is not None for p in params):
        torch._foreach_add_([p.grad for p in params], list(grads.to(params[0].grad.dtype).unbind(0)))
        return
    for p, g in zip(params, grads.unbind(0)):
        if p.grad is None:
            p.grad = g.to(p.dtype)
        else:
            p.grad.add_(g)


# A batch's P and N rows in the compute dtype are at most this large (unless one group alone is): the
# kernels get large enough to fill a GPU while the batch's temporaries (about 4x this, held by the
# CUDA graphs' pool for a stage) stay small next to the model. The operator alone at 953M parameters
# on an H100 (benchmarks/RESULTS.md): 16.6 ms per step with 64 MiB, 12.5 ms with 256 MiB.
BATCH_BYTES = 128 << 20


def _batches(groups: list) -> list:
    """Groups of equal keys, in order, cut into batches of at most BATCH_BYTES of rows."""
    by_key = {}
    for g in groups:
        by_key.setdefault(g.key, []).append(g)
    out = []
    for same in by_key.values():
        per = max(1, BATCH_BYTES // same[0].work_bytes())
        out += [_Batch(same[i:i + per]) for i in range(0, len(same), per)]
    return out


class InPlaceLayer:
    """Materialize / restore the operators of one layer shard (see the module docstring)."""

    def __init__(self, linears: dict, attn_op, ffn_op, d: int, r: int):
        self.linears = linears
        self.groups = []
        if attn_op is not None and attn_op.active:
            b, k = attn_op.p_pos.shape
            ng_local = linears["qkv"].weight.shape[0] // ((r + 2) * d)
            # The QKV bias (Qwen2) is the V rows' extra column: a segment of their group, with their beta.
            v_attrs = ["weight"] + (["bias"] if linear_bias(linears["qkv"]) is not None else [])
            if _packed(attn_op, ng_local):
                v = [_PackedSegment("qkv", 0, b, k, ng_local, (r + 2) * d, (r + 1) * d, d, attn_op.beta_v, attr=a)
                     for a in v_attrs]
                o = _PackedSegment("proj", 1, b, k, ng_local, r * d, 0, r * d, None)
            else:
                v_rows = lambda pos: unit_rows(pos, (r + 2) * d, (r + 1) * d, d)  # noqa: E731
                o_cols = lambda pos: unit_rows(pos, r * d, 0, r * d)  # noqa: E731
                v = [_Segment("qkv", 0, v_rows(attn_op.p_pos), v_rows(attn_op.n_pos), attn_op.beta_v, attr=a)
                     for a in v_attrs]
                o = _Segment("proj", 1, o_cols(attn_op.p_pos), o_cols(attn_op.n_pos), None)
            if attn_op.shared:
                self.groups.append(_Group(linears, *attn_op._v_side(), [*v, o]))
            else:
                self.groups += [_Group(linears, *attn_op._v_side(), v), _Group(linears, *attn_op._o_side(), [o])]
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
            self.groups.append(_Group(linears, ffn_op.monarch_l, ffn_op.monarch_r, ffn_op.alpha, segments))
        self.packed = all(isinstance(s, _PackedSegment) for g in self.groups for s in g.segments)
        self.batches = [_Batch([g]) for g in self.groups]  # a layer on its own (the runner batches layers)
        self.materialized = False

    def materialize(self) -> None:
        """Write the W_eff rows into the weights (keeping the originals)."""
        if not self.materialized:
            _run(self.batches, "materialize")
            self.materialized = True

    def restore(self, with_grads: bool, keep: bool = False) -> None:
        """Put the original rows back; with ``with_grads``, turn main_grad's dL/dW_eff rows into dL/dW
        rows and accumulate the operator's gradients."""
        if self.materialized:
            if any(batch.saved is None for batch in self.batches):
                raise RuntimeError("InPlaceLayer.restore: this layer was materialized by an InPlaceRunner, "
                                   "which holds the original rows; restore it through the runner")
            _run(self.batches, "restore", with_grads, keep)
            self.materialized = False

    def operator_params(self) -> list:
        """The operator parameters this layer's chain rule writes gradients into."""
        return list({id(p): p for g in self.groups for p in g.operator_params()}.values())


def _run(batches: list, method: str, *args) -> None:
    for batch in batches:
        getattr(batch, method)(*args)


_CAPTURE_STREAMS: dict = {}


def _capture_stream() -> "torch.cuda.Stream":
    """One side stream per device for every capture of the process, in every stage.

    PyTorch caches a cuBLAS workspace (32 MiB at its default on Hopper) per (handle, stream) for the
    life of the process, so every new stream that runs a matmul (the operator's Monarch products) adds
    one for good: a fresh stream per stage would grow the allocated memory at every stage boundary.
    """
    device = torch.cuda.current_device()
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


class InPlaceRunner:
    """Materialize / restore of all local layers, once per step, in batches of layers of equal shape
    (:func:`_batches`); replayed from two CUDA graphs on a GPU.

    The per-step work is a few hundred kernels (row copies per layer, arithmetic per batch) whose
    launches would cost a GPU more host time than their work. It reads and writes only persistent
    tensors (weights, ``main_grad``,
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
        self._batches = []
        self._restored = set()  # batches restored this step by the gate (overlapped reduction)
        self._reset()

    def _reset(self) -> None:
        self._eager_steps = 0
        self._g_mat = self._g_res = None
        self._stream = None

    def release(self) -> None:
        """Drop the graphs and the buffers they own (at a boundary and at the final fuse)."""
        self._key = None
        self._batches = []
        self._reset()

    def _check(self, layers: list) -> None:
        # The key holds the layers themselves (compared by identity), so a new layer can never pass for a
        # freed one.
        if self._key != layers:
            self._key = list(layers)  # new operators (a boundary, a restore): new graphs after one eager step
            self._batches = _batches([g for layer in layers for g in layer.groups])
            self._reset()

    def _graphs_on(self, layers: list) -> bool:
        return (self.use_graphs and torch.cuda.is_available() and any(layer.groups for layer in layers)
                and layers[0].linears["qkv"].weight.is_cuda)

    @staticmethod
    def _warn(exc: Exception) -> None:
        logger.warning("APEX: CUDA graph capture of the operator failed (%s: %s); running "
                                            "it eagerly from now on (apex.cuda_graphs=false avoids the attempt)",
                                            type(exc).__name__, exc)

    @staticmethod
    def _mark(layers: list, materialized: bool) -> None:
        for layer in layers:
            layer.materialized = materialized

    def _fall_back(self, layers: list, exc: Exception) -> None:
        """A failed materialize capture: nothing captured ran, so the weights are the originals (the
        rows the capture left in ``saved`` were never written and are dropped)."""
        self._warn(exc)
        self.use_graphs = False
        self._reset()
        self._mark(layers, False)
        for batch in self._batches:
            batch.saved = None

    def batch_weights(self) -> list:
        """Per batch (in order), the weights (and QKV biases) whose P and N rows it writes."""
        return [list({id(p): p for g in batch.groups for s in g.segments
                      for p in [getattr(g.linears[s.kind], s.attr)]}.values()) for batch in self._batches]

    def restore_batch(self, index: int) -> None:
        """The chain rule and the original rows of one batch, on its own (eagerly, graphs or not): for
        :class:`GradReadyGate`, as soon as the gradients of its weights are complete."""
        if index in self._restored:
            return
        batch = self._batches[index]
        for g in batch.groups:  # this step's operator gradients, from this chain rule alone
            for p in g.operator_params():
                p.grad = None
        batch.restore(True, self._g_mat is not None)  # a graph's saved rows stay its buffers
        self._restored.add(index)

    def materialize(self, layers: list) -> None:
        self._check(layers)
        self._restored = set()
        if not layers or layers[0].materialized:
            return
        if self._graphs_on(layers) and self._eager_steps >= 1:
            if self._g_mat is None:
                self._stream = _capture_stream()
                self._stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self._stream):  # warm up on the capture stream: no net change
                    _run(self._batches, "materialize")
                    _run(self._batches, "restore", False)
                torch.cuda.current_stream().wait_stream(self._stream)
                try:
                    g = torch.cuda.CUDAGraph()
                    # The outer stream context puts the current stream back even if ending a failed
                    # capture raises on the way out of the inner one.
                    with torch.cuda.stream(self._stream):
                        with torch.cuda.graph(g, stream=self._stream, capture_error_mode="thread_local"):
                            _run(self._batches, "materialize")
                    self._g_mat = g  # the batches' saved rows are now its buffers, kept (restore keep=True)
                except RuntimeError as exc:
                    self._fall_back(layers, exc)
            if self._g_mat is not None:
                self._g_mat.replay()
                self._mark(layers, True)
                return
        _run(self._batches, "materialize")
        self._mark(layers, True)

    def restore(self, layers: list, with_grads: bool) -> None:
        self._check(layers)
        if not layers or not layers[0].materialized:
            return
        graphed = self.use_graphs and self._g_mat is not None
        if self._restored:  # the gate restored some batches during the backward pass: the others now
            for i, batch in enumerate(self._batches):
                if with_grads:
                    self.restore_batch(i)
                elif i not in self._restored:
                    batch.restore(False, graphed)
            self._restored = set()
            self._mark(layers, False)
            self._eager_steps += 1 if with_grads else 0
            return
        params = [p for layer in layers for p in layer.operator_params()] if with_grads else []
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
                            _run(self._batches, "restore", True, True)
                    self._g_res = g
                self._g_res.replay()
                self.replays += 1
                self._mark(layers, False)
                return
            except RuntimeError as exc:  # nothing captured ran: the rows are still W_eff, the saved rows intact
                self._warn(exc)
                self.use_graphs = graphed = False
        for p in params:
            p.grad = None
        _run(self._batches, "restore", with_grads, graphed)
        self._mark(layers, False)
        if with_grads:
            self._eager_steps += 1
        if not self.use_graphs and self._g_mat is not None:
            self._reset()


class GradReadyGate:
    """Overlapped gradient reduction with the in-place operator (see the module docstring).

    Wraps ``register_grad_ready`` of megatron-core's bucket groups: on the last micro-batch, the call
    for a weight whose P and N rows an in-place batch writes is held until every weight of that batch
    has made it; then the batch's chain rule and restore run (:meth:`InPlaceRunner.restore_batch`) and
    the held calls go on, in their order. Calls for other parameters pass straight through. Backward
    runs from the last layer to the first, so a batch of late layers is released while early layers are
    still in their backward pass.
    """

    def __init__(self, runner: InPlaceRunner, bucket_groups: list):
        self.runner = runner
        self.batch_of = {}   # id(weight) -> batch index, armed at every materialize
        self.need = []       # per batch: how many weights
        self.held = []       # per batch: the held calls
        self.releases = 0    # batches restored from a held call (for tests)
        for group in bucket_groups:
            group.register_grad_ready = self._wrap(group, group.register_grad_ready)

    def arm(self) -> None:
        """This step's batches (after the runner's materialize)."""
        weights = self.runner.batch_weights()
        self.batch_of = {id(w): i for i, ws in enumerate(weights) for w in ws}
        self.need = [len(ws) for ws in weights]
        self.held = [[] for _ in weights]

    def disarm(self) -> None:
        self.batch_of, self.need, self.held = {}, [], []

    def _wrap(self, group, register):
        def register_grad_ready(param, force_all_reduce=False):
            i = self.batch_of.get(id(param))
            if i is None or not group.is_last_microbatch:
                return register(param, force_all_reduce)
            held = self.held[i]
            held.append((register, param, force_all_reduce))
            if len(held) == self.need[i]:
                self.runner.restore_batch(i)
                self.releases += 1
                self.held[i] = []
                for call, p, force in held:
                    call(p, force)
            return None

        return register_grad_ready
