"""Fuse the operators of a checkpoint saved in the middle of an APEX stage, in one process.

A mid-stage checkpoint holds plain (global) model weights plus, per (PP, TP, DP) rank, the stage's
operator state (``resume.STATE_KEY``). Exporting or analysing such a checkpoint needs the plain
model the run would have after fusing. Here the per-rank operators of every layer are joined into
one TP=1 operator (partitions are rank-contiguous, so parameters concatenate along the partition
axis, ranks without a block adding none, an operator that spans the ranks taken from one of its
replicas, and selections are already global) and applied to the global weights with the same fuse
functions the engine uses.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from megatron_apex.expansion.resume import STATE_KEY
from megatron_apex.expansion.operator import AttentionExpansion, FFNExpansion
from megatron_apex.expansion.partial import PartialDeltas, tuned_units

logger = logging.getLogger(__name__)

# Concatenation axis of each delta when joining TP shards (see PartialDeltas).
_DELTA_AXIS = {"qkv_delta": 0, "proj_delta": 1, "gate_delta": 0, "up_delta": 0, "fc2_delta": 1, "qkv_bias_delta": 0}


def has_active_operators(common: dict) -> bool:
    """True when a checkpoint was saved with APEX operators that are not fused yet."""
    apex = common.get("apex")
    return bool(apex) and not apex.get("finished", False) and apex.get("stage", 0) > 0


def load_rank_states(checkpoint_dir: str, common: dict) -> dict:
    """{(pp, tp): operator state} of data-parallel rank 0 (all DP replicas hold the same operators)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_apex.training.checkpoint import load_sharded

    layout = common["layout"]
    shape = (layout["pp"], layout["tp"], layout["dp"])
    request = {f"{pp}_{tp}": ShardedObject(STATE_KEY, None, shape, (pp, tp, 0), replica_id=0)
               for pp in range(layout["pp"]) for tp in range(layout["tp"])}
    # Only DP rank 0's shards are asked for: the access check would call the other replicas missing.
    loaded = load_sharded(request, checkpoint_dir, validate_access_integrity=False)
    return {(pp, tp): loaded[f"{pp}_{tp}"] for pp in range(layout["pp"]) for tp in range(layout["tp"])}


def _join(states: list, axis_of=lambda name: 0) -> dict:
    """Concatenate TP shards of an operator state dict (buffers p_pos/n_pos are rebuilt globally)."""
    keys = [k for k in states[0] if k not in ("p_pos", "n_pos", "attn_units", "ffn_units")]
    # A rank without a block of the operator (fewer blocks than TP ranks) holds no parameters.
    return {k: torch.cat([s[k] for s in states if k in s], dim=axis_of(k)) for k in keys}


def _global_operator(kind: str, selection: dict, shards: list, d: int, r: int, blocks: int = 0):
    if selection is None or not shards:
        return None
    b, k_per = selection["p_pos"].shape
    op = AttentionExpansion(b, k_per, d, r, monarch_blocks=blocks) if kind == "attn" else \
        FFNExpansion(b, k_per, monarch_blocks=blocks)
    op.load_state_dict({**_join(shards), "p_pos": selection["p_pos"], "n_pos": selection["n_pos"]})
    return op


@torch.no_grad()
def fuse_global_weights(weights: dict, cfg, rank_states: dict, prefix: str = "decoder.layers.") -> int:
    """Fuse the saved operators into ``weights`` (global TP=1 tensors, keys ``decoder.layers.{i}...``).

    A QKV bias (``...linear_qkv.bias``) is fused with its rows when ``weights`` holds it. Returns the number
    of layers fused. The weights are modified in place (their dict entries replaced).
    """
    m = cfg.model
    d, r = m.head_dim, m.num_attention_heads // m.query_groups
    tp_size = 1 + max(tp for _, tp in rank_states)
    per_layer = {}
    for (pp, tp), state in rank_states.items():
        for saved in state["layers"]:
            per_layer.setdefault(saved["index"], {})[tp] = saved
    fused = 0
    for index, by_tp in sorted(per_layer.items()):
        shards = [by_tp[t] for t in range(tp_size)]
        selection = shards[0]["selection"]
        ops = {}
        for kind in ("attn", "ffn"):
            states = [s["ops"][f"{kind}_op"] for s in shards if f"{kind}_op" in s["ops"]]
            if kind in shards[0].get("spanning", ()):  # replicated on every TP rank (expansion/spanning.py)
                states = states[:1]
            ops[kind] = _global_operator(kind, selection.get(kind), states, d, r, cfg.apex.monarch_blocks)
        deltas = _global_deltas(shards, selection, m.hidden_size, d, r)
        if not any(ops.values()) and deltas is None:
            continue
        base = f"{prefix}{index}."
        names = {"qkv": "self_attention.linear_qkv.weight", "qkv_bias": "self_attention.linear_qkv.bias",
                 "proj": "self_attention.linear_proj.weight", "fc1": "mlp.linear_fc1.weight",
                 "fc2": "mlp.linear_fc2.weight"}
        for kind, name in names.items():
            op = ops["attn"] if kind in ("qkv", "qkv_bias", "proj") else ops["ffn"]
            if kind == "qkv_bias" and base + name not in weights:
                continue  # no QKV bias (or the caller fuses weights only)
            w = weights[base + name]
            if deltas is not None:
                new = getattr(deltas, f"fuse_{kind}")(w.float(), expansion=op)
            elif op is not None:
                new = getattr(op, f"fuse_{kind}")(w.float())
            else:
                continue
            weights[base + name] = new.to(w.dtype)
        fused += 1
    logger.info("fused the APEX operators of %d layers", fused)
    return fused


def _global_deltas(shards: list, selection: dict, h: int, d: int, r: int) -> Optional[PartialDeltas]:
    states = [s["ops"]["deltas"] for s in shards if "deltas" in s["ops"]]
    if not states:
        return None
    units = {}
    for kind in ("attn", "ffn"):
        sel = selection.get(kind)
        units[kind] = (torch.empty(0, dtype=torch.int64) if sel is None else
                       tuned_units(sel["p_pos"].reshape(-1), sel["n_pos"].reshape(-1), sel["E"]))
    deltas = PartialDeltas(units["attn"], units["ffn"], h, d, r, qkv_bias="qkv_bias_delta" in states[0])
    joined = _join(states, axis_of=lambda name: _DELTA_AXIS[name])
    deltas.load_state_dict({**joined, "attn_units": units["attn"], "ffn_units": units["ffn"]})
    return deltas
