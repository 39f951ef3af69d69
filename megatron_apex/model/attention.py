"""Core attention through torch's ``scaled_dot_product_attention``, with context parallelism.

megatron-core's local ``DotProductAttention`` materialises the full ``[b, np, sq, sk]`` score
matrix. When Transformer Engine is absent we use SDPA instead: flash / memory-efficient kernels
on GPU, a fused kernel on CPU, same mathematics (causal softmax attention, optional dropout).
Subclassing keeps megatron-core's constructor checks, per-partition sizes and state-dict hooks.

**Context parallelism** (``parallel.context_parallel_size`` > 1), which megatron-core's local
attention refuses: every CP rank holds two of the sequence's ``2 x CP`` chunks (chunks ``r`` and
``2 CP - 1 - r``, megatron-core's load-balanced layout, which its rotary embedding slices the same
way). Keys and values are all-gathered over the CP group (their gradients reduce-scattered back),
and the local queries attend to every key at a global position not after their own. This is the
all-gather form of CP (Transformer Engine's ``cp_comm_type="all_gather"``): per layer and
micro-batch it moves ``(CP - 1) / CP`` of the K and V activations, small under GQA.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def cp_chunk_positions(seq_len: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Global positions of the tokens a CP rank holds: chunks ``cp_rank`` and ``2 cp_size - 1 - cp_rank``
    of ``2 cp_size`` equal chunks, in that order (``[seq_len // cp_size]``)."""
    c = seq_len // (2 * cp_size)
    if c * 2 * cp_size != seq_len:
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x context_parallel_size={2 * cp_size}")
    chunks = torch.tensor([cp_rank, 2 * cp_size - 1 - cp_rank], device=device)
    return (chunks[:, None] * c + torch.arange(c, device=device)).reshape(-1)


def cp_slice(t: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> torch.Tensor:
    """The part of ``t`` (sequence along ``dim``) a CP rank holds (see :func:`cp_chunk_positions`)."""
    return t.index_select(dim, cp_chunk_positions(t.shape[dim], cp_rank, cp_size, t.device))


class SDPAttention(DotProductAttention):
    """Causal attention via ``F.scaled_dot_product_attention``; GQA handled natively; CP by all-gather."""

    def __init__(self, config, *args, **kwargs):
        cp_size = config.context_parallel_size
        if cp_size > 1:  # megatron-core's constructor refuses CP for its own (unfused) attention
            config = copy.copy(config)
            config.context_parallel_size = 1
        super().__init__(config, *args, **kwargs)
        if cp_size > 1:
            self.config.context_parallel_size = cp_size  # a copy: the shared config is unchanged
        self.cp_group = parallel_state.get_context_parallel_group() if cp_size > 1 else None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor attention bias; "
                                      "use model.transformer_impl='transformer_engine'")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        mask = None if causal else _as_sdpa_mask(attention_mask)
        if self.cp_group is not None:
            if not causal:
                raise NotImplementedError("SDPAttention under context parallelism supports causal attention only")
            key, value, mask = self._gather_cp(query, key, value)
            causal = False
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            # [b, ng, sk, d] -> [b, np, sk, d]; query head j attends with kv head j // groups.
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        dropout = self.attention_dropout.p if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                             scale=self.softmax_scale)
        # [b, np, sq, d] -> [sq, b, np*d]
        ctx = ctx.permute(2, 0, 1, 3).contiguous()
        return ctx.view(ctx.size(0), ctx.size(1), self.hidden_size_per_partition)

    def _gather_cp(self, query, key, value):
        """Keys and values of the whole sequence (in CP-rank order) and the causal mask of the local
        queries against them (True = may attend)."""
        group = self.cp_group
        cp_size, cp_rank = group.size(), group.rank()
        s_local = query.shape[0]
        seq = s_local * cp_size
        kv = gather_from_sequence_parallel_region(torch.cat([key, value], dim=-1), True, group=group)
        key, value = kv.split([key.shape[-1], value.shape[-1]], dim=-1)
        q_pos = cp_chunk_positions(seq, cp_rank, cp_size, query.device)
        k_pos = torch.cat([cp_chunk_positions(seq, r, cp_size, query.device) for r in range(cp_size)])
        return key, value, k_pos[None, :] <= q_pos[:, None]  # [s_local, seq]


def _as_sdpa_mask(mask):
    """megatron masks are True where attention is *forbidden*; SDPA wants True where allowed."""
    if mask is None:
        return None
    return ~mask if mask.dtype == torch.bool else mask
