"""Effective rank (Roy & Vetterli, 2007) of every weight matrix of a checkpoint.

    erank(W) = exp(-sum_i p_i log p_i),   p_i = s_i / sum_j s_j,   s_i the singular values of W

It lies in [1, min(out, in)]: n for an n x n identity (all s_i equal), 1 for a rank-1 matrix. The APEX
paper argues that expansion raises it; this module reports it per layer and matrix (Q, K, V, O, gate,
up, down; embeddings and output layer), from the global tensors of a checkpoint of any layout. A
checkpoint saved in the middle of an APEX stage is measured with the stage's operators fused into
the weights (the model the run was training, and what an export writes).
"""

from __future__ import annotations

import math

import torch

from megatron_apex.analysis.checkpoint_io import checkpoint_dir, load_common, load_model_tensors

MATRICES = ("q", "k", "v", "o", "gate", "up", "down")
# The model signature's fields that fix the matrices' shapes (training.checkpoint.model_signature).
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "query_groups", "head_dim",
                "padded_vocab_size")
# The stacked layer weights an APEX operator changes when it is fused.
FUSED_KEYS = ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight", "mlp.linear_fc1.weight",
              "mlp.linear_fc2.weight")


def effective_rank(w: torch.Tensor) -> float:
    """Roy-Vetterli effective rank of a 2-D tensor (0.0 for an all-zero matrix)."""
    if w.dim() != 2:
        raise ValueError(f"effective_rank needs a matrix, got shape {tuple(w.shape)}")
    s = torch.linalg.svdvals(w.detach().double())
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def split_layer(tensors: dict, layer: int, cfg_model: dict) -> dict:
    """The seven matrices of one transformer layer from the stacked global tensors."""
    heads, groups = cfg_model["num_attention_heads"], cfg_model["num_query_groups"] or cfg_model["num_attention_heads"]
    h = cfg_model["hidden_size"]
    d = cfg_model["kv_channels"] or h // heads
    r = heads // groups
    qkv = tensors["decoder.layers.self_attention.linear_qkv.weight"][layer]  # [g*(r+2)*d, h], per group [q; k; v]
    per_group = qkv.view(groups, r + 2, d, qkv.shape[-1])
    fc1 = tensors["decoder.layers.mlp.linear_fc1.weight"][layer]  # [gate; up]
    gate, up = fc1.chunk(2, dim=0)
    return {"q": per_group[:, :r].reshape(groups * r * d, -1), "k": per_group[:, r].reshape(groups * d, -1),
            "v": per_group[:, r + 1].reshape(groups * d, -1),
            "o": tensors["decoder.layers.self_attention.linear_proj.weight"][layer],
            "gate": gate, "up": up, "down": tensors["decoder.layers.mlp.linear_fc2.weight"][layer]}


def checkpoint_effective_ranks(checkpoint: str) -> dict:
    """{'layers': [{matrix: erank}], 'global': {name: erank}, 'step': int, 'shape': {field: size},
    'fused_operators': bool} of a checkpoint.

    A checkpoint saved in the middle of an APEX stage is measured as the model the run was training:
    the stage's operators are fused into the weights first, as the export does ('fused_operators')."""
    path = checkpoint_dir(checkpoint)
    common = load_common(path)
    model = common["config"]["model"]
    tensors = load_model_tensors(path)
    fused = fuse_active_operators(tensors, common, path)
    layers = []
    for li in range(model["num_layers"]):
        mats = split_layer(tensors, li, model)
        layers.append({name: effective_rank(mats[name]) for name in MATRICES})
    glob = {}
    for name, key in (("embedding", "embedding.word_embeddings.weight"), ("output_layer", "output_layer.weight")):
        if key in tensors:
            glob[name] = effective_rank(tensors[key])
    signature = common["model_signature"]
    return {"step": common["step"], "layers": layers, "global": glob, "apex": common.get("apex"),
            "shape": {k: signature[k] for k in SHAPE_FIELDS if k in signature}, "fused_operators": fused}


def fuse_active_operators(tensors: dict, common: dict, path: str) -> bool:
    """Fold the APEX operators of a mid-stage checkpoint into its stacked global ``tensors`` (in place) with
    the exporter's fuse; returns whether there were any."""
    from megatron_apex.config import config_from_dict
    from megatron_apex.convert.exporter import fuse_expansion

    stacked = {key: tensors[f"decoder.layers.{key}"] for key in FUSED_KEYS}
    layers = {f"decoder.layers.{i}.{key}": t[i] for key, t in stacked.items() for i in range(t.shape[0])}
    views = dict(layers)
    if not fuse_expansion(layers, common, path, config_from_dict(common["config"])):
        return False
    for name, tensor in layers.items():
        if tensor is not views[name]:
            views[name].copy_(tensor)
    return True


def shape_differences(first: dict, second: dict) -> list:
    """The model-shape fields in which two :func:`checkpoint_effective_ranks` results differ, as text."""
    a, b = first["shape"], second["shape"]
    return [f"{k} {a.get(k)} vs {b.get(k)}" for k in SHAPE_FIELDS if a.get(k) != b.get(k)]


def format_table(result: dict, compare: dict | None = None) -> str:
    """Per-layer table; with ``compare``, each cell is ``value (delta)`` with delta = compare - result."""
    cols = list(MATRICES)
    width = 17 if compare else 9
    head = f"{'layer':>5} " + " ".join(f"{c:>{width}}" for c in cols)
    lines = [head, "-" * len(head)]
    for li, row in enumerate(result["layers"]):
        cells = []
        for c in cols:
            if compare:
                other = compare["layers"][li][c]
                cells.append(f"{other:8.3f} ({other - row[c]:+6.3f})".rjust(width))
            else:
                cells.append(f"{row[c]:{width}.3f}")
        lines.append(f"{li:>5} " + " ".join(cells))
    for name, v in result["global"].items():
        if compare and name in compare["global"]:
            lines.append(f"{name}: {compare['global'][name]:.3f} ({compare['global'][name] - v:+.3f})")
        else:
            lines.append(f"{name}: {v:.3f}")
    return "\n".join(lines)
