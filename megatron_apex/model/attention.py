"""Core attention through torch's ``scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` materialises the full ``[b, np, sq, sk]`` score
matrix. When Transformer Engine is absent we use SDPA instead: flash / memory-efficient kernels
on GPU, a fused kernel on CPU, same mathematics (causal softmax attention, optional dropout).
Subclassing keeps megatron-core's constructor checks, per-partition sizes and state-dict hooks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """Causal attention via ``F.scaled_dot_product_attention``; GQA handled natively."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor attention bias; "
                                      "use model.transformer_impl='transformer_engine'")
        mask_type = attn_mask_type or self.attn_mask_type
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            # [b, ng, sk, d] -> [b, np, sk, d]; query head j attends with kv head j // groups.
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        dropout = self.attention_dropout.p if self.training else 0.0
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if causal else _as_sdpa_mask(attention_mask),
            dropout_p=dropout, is_causal=causal, scale=self.softmax_scale)
        # [b, np, sq, d] -> [sq, b, np*d]
        ctx = ctx.permute(2, 0, 1, 3).contiguous()
        return ctx.view(ctx.size(0), ctx.size(1), self.hidden_size_per_partition)


def _as_sdpa_mask(mask):
    """megatron masks are True where attention is *forbidden*; SDPA wants True where allowed."""
    if mask is None:
        return None
    return ~mask if mask.dtype == torch.bool else mask
