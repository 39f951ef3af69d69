"""An operator whose blocks do not fit on one tensor-parallel rank: replicated, with its rows exchanged.

The stage's permutation packs every block's k/B P and k/B N units together, so a block normally lies on
one rank (partition.py). Where it cannot (4 query groups at TP=4 hold one group a rank, and a P/N pair
needs two), the unit kind's operator *spans* the tensor-parallel group (``geometry.spans``):

* every rank of the group holds the whole operator (all B blocks, drawn as TP=1 draws them);
* each linear call gathers the rows of the layer's 2k P and N units into a small *virtual* weight (the
  units in block order, P then N within a block: exactly the packed layout over 2k units), by one
  all-reduce over the group in which every rank adds the rows it holds and zeros elsewhere;
* the operator runs on that virtual weight, unchanged, and every rank writes back the W_eff rows of the
  units it holds.

Backward: the gradient of the virtual weight is summed over the group (each rank's part comes through
the rows it holds) and every rank takes its own rows; the operator's parameters get each rank's part,
summed over the group before the operator's optimizer steps (``StageBoundary.optimizer_step``). So the
function, and up to summation order its gradients, are TP=1's. The price: per linear call, two
all-reduces of the 2k units' rows (forward and backward), and the operator's arithmetic on every rank.
Such a kind runs on the per-call path (W_eff built in each linear call), never in place.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_apex.expansion.operator import unit_rows

# Per linear: (dim along which the units lie, two halves (fc1's gate and up), rows per unit from r and d)
LINEARS = {"qkv": (0, False, lambda r, d: (r + 2) * d), "proj": (1, False, lambda r, d: r * d),
           "fc1": (0, True, lambda r, d: 1), "fc2": (1, False, lambda r, d: 1)}


class _Exchange(torch.autograd.Function):
    """``w`` (a rank's shard) -> the virtual weight: the rows ``virt`` gathered from every rank's ``local``
    rows (an all-reduce of a zero buffer each rank fills with its own rows: exact). Backward: the
    gradient summed over the group, each rank taking its own rows."""

    @staticmethod
    def forward(ctx, w, dim, local, virt, size, group):  # noqa: D401
        shape = list(w.shape)
        shape[dim] = size
        buf = w.new_zeros(shape)
        buf.index_copy_(dim, virt, w.index_select(dim, local))
        dist.all_reduce(buf, group=group)
        ctx.dim, ctx.group, ctx.shape = dim, group, tuple(w.shape)
        ctx.save_for_backward(local, virt)
        return buf

    @staticmethod
    def backward(ctx, grad):
        local, virt = ctx.saved_tensors
        grad = grad.contiguous().clone()  # reduced in place
        dist.all_reduce(grad, group=ctx.group)
        out = grad.new_zeros(ctx.shape)
        out.index_copy_(ctx.dim, local, grad.index_select(ctx.dim, virt))
        return out, None, None, None, None, None


class Span:
    """Which of a layer's 2k P and N units this rank holds, for an operator that spans the group.

    ``units``: ``[2k]`` global unit positions in virtual order (block by block, P then N: the stage's
    ``cat([p_pos, n_pos], 1)``); rank q holds units ``[q n/t, (q+1) n/t)``.
    """

    def __init__(self, units: torch.Tensor, n_units: int, tp_rank: int, tp_size: int, group, r: int, d: int):
        units = units.detach().cpu().long().reshape(-1)
        n_loc = n_units // tp_size
        mine = (units // n_loc) == tp_rank
        self.n_virt, self.n_loc = units.numel(), n_loc
        self.virt = torch.nonzero(mine).reshape(-1)  # virtual indices of the units held here
        self.local = units[mine] - tp_rank * n_loc   # and their local positions
        self.group, self.r, self.d = group, r, d
        self._rows = {}

    def rows(self, linear: str, device) -> tuple:
        """(local rows, virtual rows, virtual size) of one linear along its unit dim."""
        key = (linear, str(device))
        if key not in self._rows:
            dim, halves, unit = LINEARS[linear]
            u = unit(self.r, self.d)
            local = unit_rows(self.local.unsqueeze(0), u, 0, u).reshape(-1)
            virt = unit_rows(self.virt.unsqueeze(0), u, 0, u).reshape(-1)
            size = self.n_virt * u
            if halves:  # gate rows, then up rows, in both the shard and the virtual weight
                local = torch.cat([local, local + self.n_loc * u])
                virt = torch.cat([virt, virt + size])
                size *= 2
            self._rows[key] = (local.to(device), virt.to(device), size)
        return self._rows[key]

    def apply(self, linear: str, w: torch.Tensor, fn) -> torch.Tensor:
        """W_eff of this rank's shard ``w``: gather the virtual weight, ``fn`` (the operator on it), and
        this rank's rows of the result written into a copy of ``w``."""
        dim = LINEARS[linear][0]
        local, virt, size = self.rows(linear, w.device)
        eff = fn(_Exchange.apply(w, dim, local, virt, size, self.group))
        return w.index_copy(dim, local, eff.index_select(dim, virt))
