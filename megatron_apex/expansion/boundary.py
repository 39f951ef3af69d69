"""The stage boundary of APEX: select P and N per layer from the votes, permute the units so that every
operator block sits on one tensor-parallel rank, build the new zero-initialised operators and their
optimizer, and fold finished operators into the weights (fuse).

Cross-rank expansion by permutation: one global function-preserving permutation per layer
(partition.balance_permutation) gives every one of the B blocks k/B P and k/B N units, packed at the
start of its block (partition.pack_partitions, so the in-place operator reads strided blocks). It is
applied to weights, fp32 master weights and Adam moments (state.ParamStates; one TP all-gather per
tensor, at boundaries only). The operator is block-diagonal over the blocks, so it is rank-local and
TP=1 computes exactly what TP=2 does. Where one block's P and N units do not fit on a rank, the kind's
operator spans the group instead (expansion/spanning.py), with the same result.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_apex.config import Config
from megatron_apex.expansion.geometry import UNIT_NAMES, Geometry, unit_share
from megatron_apex.expansion.inplace import InPlaceLayer, linear_bias
from megatron_apex.expansion.operator import AttentionExpansion, FFNExpansion, monarch_sq_norms
from megatron_apex.expansion.partial import PartialDeltas, local_units, tuned_units
from megatron_apex.expansion.partition import (balance_permutation, local_blocks, pack_partitions, packed_positions,
                                               permute_fc1, permute_units, round_k_to_partitions, shard_positions)
from megatron_apex.expansion.spanning import Span
from megatron_apex.expansion.selection import progressive_k, select_units, select_units_partial
from megatron_apex.expansion.state import ParamStates, reduce_and_clip_grads, tp_gather, tp_shard
from megatron_apex.training.schedule import lr_at


class Layer:
    """One local transformer layer: its linears, global index, and this stage's operators."""

    def __init__(self, layer, global_index: int):
        self.layer = layer
        self.index = global_index
        attn, mlp = layer.self_attention, layer.mlp
        self.linears = {"qkv": attn.linear_qkv, "proj": attn.linear_proj, "fc1": mlp.linear_fc1,
                        "fc2": mlp.linear_fc2}
        self.attn_op: Optional[AttentionExpansion] = None
        self.ffn_op: Optional[FFNExpansion] = None
        self.deltas: Optional[PartialDeltas] = None
        self.inplace: Optional[InPlaceLayer] = None
        self.selection: dict = {}  # global index sets of the current stage (for logs and checkpoints)

    def operators(self) -> list:
        return [m for m in (self.attn_op, self.ffn_op, self.deltas) if m is not None]

    def clear(self) -> None:
        self.attn_op = self.ffn_op = self.deltas = self.inplace = None

    def tensors(self) -> list:
        """(kind, parameter) of every tensor an operator changes: the four weights, and the QKV bias when the
        model has one (kind 'qkv_bias': the bias column of the QKV rows)."""
        out = [(kind, linear.weight) for kind, linear in self.linears.items()]
        bias = linear_bias(self.linears["qkv"])
        return out + ([("qkv_bias", bias)] if bias is not None else [])

    def effective(self, kind: str, w: torch.Tensor) -> torch.Tensor:
        """W_eff of one tensor (``kind`` 'qkv', 'qkv_bias', 'proj', 'fc1' or 'fc2') under this stage's operators."""
        op = self.attn_op if kind in ("qkv", "qkv_bias", "proj") else self.ffn_op
        if self.deltas is not None:
            return getattr(self.deltas, f"effective_{kind}")(w, expansion=op)
        if op is None:
            return w
        return getattr(op, f"effective_{kind}")(w)


class StageBoundary:
    """The stages of one run over its local ``layers``: which stage it is, the units each layer expands
    in it, its operators and their optimizer."""

    def __init__(self, cfg: Config, geometry: Geometry, layers: list, inplace: bool):
        self.cfg, self.a, self.geometry, self.layers, self.inplace = cfg, cfg.apex, geometry, layers, inplace
        self.n = {kind: n for kind, (n, _, _) in geometry.units.items()}
        self.vote_k = {kind: k for kind, (_, k, _) in geometry.units.items()}
        self.parts = {kind: b for kind, (_, _, b) in geometry.units.items()}
        m = cfg.model
        self.r, self.d = m.num_attention_heads // m.query_groups, m.head_dim
        self.stage = 0            # number of boundaries applied
        self.finished = False     # operators fused for good
        self.stage_layers = {kind: set() for kind in UNIT_NAMES}  # global layers expanding each kind this stage
        self.excluded = {}        # progressive mode: (layer, kind) -> former N units
        self.op_optimizer = None
        self.param_states: Optional[ParamStates] = None  # set at the start of training

    # ------------------------------------------------------------------ the current stage
    def k(self, kind: str, layer: Optional[int] = None) -> tuple[int, int]:
        """(k, k_per) of the current stage for a unit kind (a multiple of its partitions); (0, 0) in a
        ``layer`` (global index) that does not expand the kind this stage (small budgets)."""
        if layer is not None and layer not in self.stage_layers[kind]:
            return 0, 0
        k0 = progressive_k(self.vote_k[kind], max(self.stage - 1, 0), self.a.progressive, self.parts[kind])
        return round_k_to_partitions(k0, self.parts[kind])

    def set_stage_layers(self) -> None:
        """The layers that expand each unit kind in the current stage (every layer, unless the kind's
        budget is below one unit per layer: then a draw from train.seed and the stage); none before the
        first boundary."""
        self.stage_layers = ({kind: set(layers) for kind, layers in self.geometry.stage_layers(self.stage - 1).items()}
                             if self.stage > 0 else {kind: set() for kind in UNIT_NAMES})

    @property
    def operators_anywhere(self) -> bool:
        """Whether the current stage expands some unit anywhere in the model (the same on every rank)."""
        return any(layers and self.k(kind)[1] for kind, layers in self.stage_layers.items())

    def op_params(self) -> list:
        return [p for entry in self.layers for op in entry.operators() for p in op.parameters()]

    def spanning_params(self) -> list:
        """The parameters of operators replicated over the tensor-parallel group (expansion/spanning.py)."""
        return [p for entry in self.layers for op in (entry.attn_op, entry.ffn_op)
                if op is not None and op.span is not None for p in op.parameters()]

    # ------------------------------------------------------------------ the boundary
    def advance(self, trainer, votes: dict, raw: dict) -> list:
        """Fuse the finished stage, start the next: select, permute, build operators and their optimizer.
        ``votes``/``raw``: per kind [local layers, n], reduced over data-parallel ranks. Returns one
        summary per local layer."""
        self.fuse()
        self.stage += 1
        self.set_stage_layers()
        summary = []
        for li, entry in enumerate(self.layers):
            perms = {kind: self.select(entry, li, kind, votes[kind][li], raw[kind][li]) for kind in ("attn", "ffn")}
            self.permute(trainer, entry, perms)
            self.build_operators(trainer.ctx, entry)
            summary.append(self.summarize(entry))
        self.build_op_optimizer()
        return summary

    def select(self, entry: Layer, li: int, kind: str, votes: torch.Tensor, raw: torch.Tensor):
        """Select P, N (and E) of one layer and unit kind; returns the global permutation (or None)."""
        n = self.n[kind]
        k, k_per = self.k(kind, entry.index)
        if k_per == 0:
            entry.selection[kind] = None
            return None
        exclude = self.excluded.get((entry.index, kind)) if self.a.progressive else None
        mask = None
        if exclude is not None:
            mask = torch.zeros(n, dtype=torch.bool)
            mask[exclude] = True
        if self.a.mode == "selected":
            ratio = self.a.attn_tuned_ratio if kind == "attn" else self.a.ffn_tuned_ratio
            e = max(0, unit_share(ratio, n) - 2 * k)
            p_units, n_units, e_units = select_units_partial(votes, raw.float(), k, e, exclude=mask)
        else:
            p_units, n_units = select_units(votes, raw.float(), k, exclude=mask)
            e_units = torch.empty(0, dtype=torch.int64)
        perm, p_pos, n_pos = pack_partitions(*balance_permutation(p_units, n_units, n, self.parts[kind]))
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(n)
        if self.a.progressive:
            # Votes of the next stage are indexed by the units' positions *after* this permutation, so
            # the excluded set (former N units, including those of earlier stages) moves with it.
            prev = self.excluded.get((entry.index, kind))
            former = n_units if prev is None else torch.cat([prev, n_units])
            self.excluded[(entry.index, kind)] = torch.sort(inv[former]).values
        entry.selection[kind] = {"P": p_units, "N": n_units, "E": inv[e_units] if e_units.numel() else e_units,
                                 "p_pos": p_pos, "n_pos": n_pos}
        return None if torch.equal(perm, torch.arange(n)) else perm

    def permute(self, trainer, entry: Layer, perms: dict) -> None:
        """Apply the layer's unit permutations to weights (and the QKV bias), master weights and Adam moments."""
        ctx = trainer.ctx
        r, d = self.r, self.d
        lin = entry.linears
        plan = []
        if perms.get("attn") is not None:
            plan += [(lin["qkv"].weight, 0, (r + 2) * d, perms["attn"], False),
                     (lin["proj"].weight, 1, r * d, perms["attn"], False)]
            if linear_bias(lin["qkv"]) is not None:  # a query group's bias entries move with its rows
                plan.append((linear_bias(lin["qkv"]), 0, (r + 2) * d, perms["attn"], False))
        if perms.get("ffn") is not None:
            plan += [(lin["fc1"].weight, 0, 1, perms["ffn"], True), (lin["fc2"].weight, 1, 1, perms["ffn"], False)]
        for param, dim, unit, perm, swiglu in plan:
            tensors = self.param_states.gather(param)
            for key, t in tensors.items():
                full = tp_gather(t, dim, ctx.tp_group, ctx.tp_size, swiglu)
                full = permute_fc1(full, perm) if swiglu else permute_units(full, perm, unit, dim)
                tensors[key] = tp_shard(full, dim, ctx.tp_rank, ctx.tp_size, swiglu).contiguous()
            self.param_states.scatter(param, tensors)

    def build_operators(self, ctx, entry: Layer) -> None:
        """Fresh zero-initialised operators (and deltas) for the layer's new selection."""
        dev = entry.linears["qkv"].weight.device
        entry.clear()
        for kind_id, kind in enumerate(("attn", "ffn")):
            sel = entry.selection.get(kind)
            if sel is None:
                continue
            # One generator per operator: a rank without a block of it (fewer blocks than TP ranks) draws
            # nothing, and the other operator's draw stays the same.
            gen = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + self.stage * 104729 + 2 * entry.index
                                                + kind_id)
            blocks, k_per = sel["p_pos"].shape
            spanning = self.geometry.spanning[kind]
            first, b_local = (0, blocks) if spanning else local_blocks(sel["p_pos"], ctx.tp_rank, ctx.tp_size,
                                                                       self.n[kind])
            if kind == "attn":
                op = AttentionExpansion(b_local, k_per, self.d, self.r, device=dev,
                                        monarch_blocks=self.a.monarch_blocks)
            else:
                op = FFNExpansion(b_local, k_per, device=dev, monarch_blocks=self.a.monarch_blocks)
            op.reset_parameters(gen, first, blocks)
            if spanning:  # every block on every rank, over the 2k gathered units (packed: P then N per block)
                p_loc, n_loc = packed_positions(blocks, k_per, 2 * blocks * k_per)
                op.span = Span(torch.cat([sel["p_pos"], sel["n_pos"]], 1), self.n[kind], ctx.tp_rank, ctx.tp_size,
                               ctx.tp_group, self.r, self.d)
            else:
                p_loc, n_loc = shard_positions(sel["p_pos"], sel["n_pos"], ctx.tp_rank, ctx.tp_size, self.n[kind])
            op.set_positions(p_loc.to(dev), n_loc.to(dev))
            setattr(entry, f"{kind}_op", op)
        if self.a.mode == "selected":
            units = {}
            for kind in ("attn", "ffn"):
                sel = entry.selection.get(kind)
                if sel is None:
                    units[kind] = torch.empty(0, dtype=torch.int64)
                    continue
                allu = tuned_units(sel["p_pos"].reshape(-1), sel["n_pos"].reshape(-1), sel["E"])
                units[kind] = local_units(allu, ctx.tp_rank, ctx.tp_size, self.n[kind])
            entry.deltas = PartialDeltas(units["attn"].to(dev), units["ffn"].to(dev), self.cfg.model.hidden_size,
                                         self.d, self.r, device=dev, qkv_bias=self.cfg.model.add_qkv_bias)
        in_place = lambda op: None if op is None or op.span is not None else op  # noqa: E731 (spanning: per call)
        entry.inplace = InPlaceLayer(entry.linears, in_place(entry.attn_op), in_place(entry.ffn_op), self.d, self.r) \
            if self.inplace else None

    def build_op_optimizer(self) -> None:
        """The operators' own AdamW (fresh state at every stage, as the method prescribes)."""
        o = self.cfg.optimizer
        ops, deltas = [], []
        for entry in self.layers:
            for op in (entry.attn_op, entry.ffn_op):
                if op is not None:
                    ops += list(op.parameters())
            if entry.deltas is not None:
                deltas += list(entry.deltas.parameters())
        groups = [{"params": ops, "lr_mult": self.a.lr_scale, "weight_decay": self.a.operator_weight_decay}]
        if deltas:
            groups.append({"params": deltas, "lr_mult": 1.0, "weight_decay": o.weight_decay})
        groups = [g for g in groups if g["params"]]
        cuda = bool(groups) and groups[0]["params"][0].is_cuda
        self.op_optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                              fused=cuda or None) if groups else None

    def optimizer_step(self, trainer, step: int) -> None:
        """The operators' update after the model's: gradients averaged over data-parallel ranks and
        clipped, then AdamW at the schedule's learning rate times apex.lr_scale. Decided alike on every
        rank: a rank (or pipeline stage) without operator blocks of its own still takes part in the
        clipping norm's reduction, with nothing to add."""
        if self.finished or self.stage == 0 or not self.operators_anywhere:
            return
        spanning = self.spanning_params()
        for p in spanning:  # every rank of the group adds its part, even one that holds none of the rows
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        seen = {id(p) for p in spanning}
        params = [p for p in self.op_params() if p.grad is not None and id(p) not in seen]
        reduce_and_clip_grads([p.grad for p in params], trainer.ctx, self.cfg.optimizer.clip_grad,
                              [p.grad for p in spanning])
        params += spanning
        if self.op_optimizer is None or not params:
            return
        for group in self.op_optimizer.param_groups:
            group["lr"] = lr_at(self.cfg, step) * group["lr_mult"]
        self.op_optimizer.step()

    def operator_norm(self, ctx=None) -> float:
        """Mean over this pipeline stage's operators of the Frobenius norm of their whole dense M (0 right
        after insertion). Under TP each rank holds some of an operator's partitions: with ``ctx`` the
        squared norms are summed over the TP group (a collective), so every layout logs the same value."""
        skip = ctx is not None and ctx.tp_rank > 0  # operators replicated over the group count on rank 0
        sq = monarch_sq_norms([op for e in self.layers for op in (e.attn_op, e.ffn_op) if op is not None], skip)
        if sq.numel() == 0:
            return 0.0
        if ctx is not None and ctx.tp_size > 1:
            sq = sq.to(ctx.device)
            dist.all_reduce(sq, group=ctx.tp_group)
        return sq.sqrt().mean().item()

    def fuse(self) -> None:
        """Fold the current operators (and deltas) into the master weights (and the QKV bias)."""
        for entry in self.layers:
            if not entry.operators():
                continue
            for kind, param in entry.tensors():
                tensors = self.param_states.gather(param)
                with torch.no_grad():
                    fused = entry.effective(kind, tensors["param"]).detach()
                self.param_states.scatter(param, {"param": fused})

    def finish(self) -> None:
        """The final fuse: the model is a plain LLaMA again."""
        self.fuse()
        for entry in self.layers:
            entry.clear()
        self.op_optimizer = None
        self.finished = True

    @staticmethod
    def summarize(entry: Layer) -> str:
        parts = []
        for kind in ("attn", "ffn"):
            sel = entry.selection.get(kind)
            if sel is None:
                parts.append(f"{kind} -")
                continue
            p = sel["P"].tolist()
            shown = ",".join(map(str, p[:4])) + ("..." if len(p) > 4 else "")
            parts.append(f"{kind} k={len(p)} P=[{shown}]")
        return f"L{entry.index}: " + " ".join(parts)
