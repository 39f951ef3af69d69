"""The operator applied once per step, in place, on the rows it changes (mode ``all``).

``W_eff`` differs from ``W`` only in the rows (columns) of the P and N units. Instead of building a
full ``W_eff`` in every linear call of every micro-batch, once per step:

1. **materialize**: gather the P and N rows of each weight (``compact``, 2k/n of the weight), compute
   their ``W_eff`` rows with the operator (no grad) and write them into the weight's storage, keeping
   the original rows. Every micro-batch then runs the unchanged linear on ``W_eff``, and the
   gradient megatron-core accumulates in ``main_grad`` is dL/dW_eff.
2. **restore** (just before megatron-core reduces gradients): recompute the compact ``W_eff`` rows
   from the original rows with autograd, back-propagate the compact slice of dL/dW_eff through it
   (this is the chain rule of ``W_eff = f(W, M, alpha, beta)``), which fills the operator's gradients
   and gives dL/dW for those rows; write them into ``main_grad`` and the original rows back.

Rows outside P and N have dL/dW = dL/dW_eff and are not touched. The cost per step is a few passes
over 2k/n of the linear weights, whatever the number of micro-batches or tokens, and the extra memory
is the saved compact rows. The result equals the per-call construction (same formulas, same
arithmetic on the same rows); the engine falls back to that path for the ``selected`` mode (frozen
base weights have no gradient buffer) and with overlapped gradient reduction.
"""

from __future__ import annotations

import copy

import torch

from megatron_apex.expansion.operator import unit_rows


def _compact_view(op, units: torch.Tensor):
    """A view of ``op`` sharing its parameters, with positions renumbered into ``units`` order."""
    view = copy.copy(op)
    view._buffers = dict(op._buffers)
    view._buffers["p_pos"] = torch.searchsorted(units, op.p_pos)
    view._buffers["n_pos"] = torch.searchsorted(units, op.n_pos)
    view._pos_max = units.numel() - 1
    return view


class InPlaceLayer:
    """Materialize / restore the operators of one layer shard (see the module docstring)."""

    def __init__(self, linears: dict, attn_op, ffn_op, d: int, r: int):
        self.linears = linears
        self.plans = []  # (kind, weight, dim, index, op view)
        if attn_op is not None and attn_op.active:
            units = torch.unique(torch.cat([attn_op.p_pos.reshape(-1), attn_op.n_pos.reshape(-1)]))
            view = _compact_view(attn_op, units)
            u = units.unsqueeze(0)
            self.plans.append(("qkv", 0, unit_rows(u, (r + 2) * d, 0, (r + 2) * d).view(-1), view))
            self.plans.append(("proj", 1, unit_rows(u, r * d, 0, r * d).view(-1), view))
        if ffn_op is not None and ffn_op.active:
            units = torch.unique(torch.cat([ffn_op.p_pos.reshape(-1), ffn_op.n_pos.reshape(-1)]))
            view = _compact_view(ffn_op, units)
            f_local = linears["fc1"].weight.shape[0] // 2
            self.plans.append(("fc1", 0, torch.cat([units, units + f_local]), view))
            self.plans.append(("fc2", 1, units, view))
        self.saved = None

    @torch.no_grad()
    def materialize(self) -> None:
        """Write the W_eff rows into the weights (keeping the originals)."""
        if self.saved is not None:
            return
        self.saved = []
        for kind, dim, index, view in self.plans:
            w = self.linears[kind].weight.data
            orig = w.index_select(dim, index)
            self.saved.append(orig)
            w.index_copy_(dim, index, view(kind, orig).to(w.dtype))

    def restore(self, with_grads: bool) -> None:
        """Put the original rows back; with ``with_grads``, turn main_grad's dL/dW_eff rows into dL/dW
        rows and accumulate the operator's gradients."""
        if self.saved is None:
            return
        outputs, grads, leaves = [], [], []
        for (kind, dim, index, view), orig in zip(self.plans, self.saved):
            param = self.linears[kind].weight
            if with_grads:
                leaf = orig.detach().float().requires_grad_(True)
                outputs.append(view(kind, leaf))
                grads.append(param.main_grad.index_select(dim, index).to(outputs[-1].dtype))
                leaves.append(leaf)
            with torch.no_grad():
                param.data.index_copy_(dim, index, orig)
        if with_grads and outputs:
            torch.autograd.backward(outputs, grads)
            with torch.no_grad():
                for (kind, dim, index, _), leaf in zip(self.plans, leaves):
                    main_grad = self.linears[kind].weight.main_grad
                    main_grad.index_copy_(dim, index, leaf.grad.to(main_grad.dtype))
        self.saved = None
