"""APEX (Advantageous Parameter EXpansion, arXiv 2505.24241): the pure-tensor core.

scoring (statistics and rank votes) -> selection (P, N, E) -> partition (balancing permutation across
TP ranks) -> monarch (structured M) -> operator (W_eff, fuse) ; partial (selected-mode deltas).
No megatron imports here: everything is a function of tensors and index sets.
"""
from .monarch import monarch_apply, monarch_init, monarch_num_params, monarch_shape, monarch_to_dense
from .operator import (
    AttentionExpansion,
    FFNExpansion,
    attn_operator_num_params,
    expand_columns,
    expand_rows,
    ffn_operator_num_params,
    fuse_layer_weights,
    shard_expansion_state,
    unit_rows,
)
from .partial import PartialDeltas, local_units, selected_mode_trainable_fraction, tuned_units
from .partition import (
    balance_permutation,
    invert_permutation,
    num_partitions,
    permute_fc1,
    permute_layer_weights,
    permute_units,
    round_k_to_partitions,
    shard_positions,
)
from .scoring import rank_votes, unit_sq_norms_attn, unit_sq_norms_ffn
from .selection import k_from_ratio, progressive_k, rank_units, select_units, select_units_partial

__all__ = [
    "rank_votes", "unit_sq_norms_ffn", "unit_sq_norms_attn",
    "k_from_ratio", "rank_units", "select_units", "select_units_partial", "progressive_k",
    "num_partitions", "round_k_to_partitions", "balance_permutation", "invert_permutation",
    "permute_units", "permute_fc1", "permute_layer_weights", "shard_positions",
    "monarch_shape", "monarch_num_params", "monarch_apply", "monarch_to_dense", "monarch_init",
    "unit_rows", "expand_columns", "expand_rows", "FFNExpansion", "AttentionExpansion",
    "ffn_operator_num_params", "attn_operator_num_params", "shard_expansion_state", "fuse_layer_weights",
    "PartialDeltas", "tuned_units", "local_units", "selected_mode_trainable_fraction",
]
