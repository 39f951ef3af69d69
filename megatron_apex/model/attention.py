"""Core attention through torch's ``scaled_dot_product_attention``, with context parallelism.

megatron-core's local ``DotProductAttention`` materialises the full ``[b, np, sq, sk]`` score
matrix. When Transformer Engine is absent we use SDPA instead: flash / memory-efficient kernels
on GPU, a fused kernel on CPU, same mathematics (causal softmax attention, optional dropout).
Subclassing keeps megatron-core's constructor checks, per-partition sizes and state-dict hooks.

**Context parallelism** (``parallel.context_parallel_size`` > 1), which megatron-core's local
attention refuses: every CP rank holds two of the sequence's ``2 x CP`` chunks (chunks ``r`` and
``2 CP - 1 - r``, megatron-core's load-balanced layout, which its rotary embedding slices the same
way). Keys and values are all-gathered over the CP group (their gradients reduce-scattered back)
and put in sequence order; the queries of local chunk ``g`` then attend to the keys of chunks
``0..g`` with the causal diagonal aligned to the lower right (``causal_lower_right``), so no
explicit mask is built, no score of a later chunk is computed, and SDPA may use its flash kernels.
This is the all-gather form of CP (Transformer Engine's ``cp_comm_type="all_gather"``): per layer
and micro-batch it moves ``(CP - 1) / CP`` of the K and V activations, small under GQA.

**Sliding window** (``model.sliding_window`` W, megatron-core's ``window_size`` (W - 1, 0)): query i
attends to keys i - W < j <= i, as Mistral does. A window that covers the sequence is plain causal
attention (SDPA's causal kernels); a shorter one is an explicit band mask, combined with the document
mask when there is one. Not under context parallelism (the configuration refuses it).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from torch.nn.attention.bias import causal_lower_right
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def cp_sequence_order(cp_size: int) -> list:
    """Where each of the ``2 CP`` sequence chunks lies in the CP ranks' all-gathered halves: rank ``r``
    holds chunks ``r`` and ``2 CP - 1 - r`` (megatron-core's ``get_batch_on_this_cp_rank``), so chunk
    ``g`` is half ``g >= CP`` of rank ``min(g, 2 CP - 1 - g)``."""
    return [2 * g if g < cp_size else 2 * (2 * cp_size - 1 - g) + 1 for g in range(2 * cp_size)]


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
        window = config.window_size
        if window is not None and (window[0] < 0 or window[1] != 0):
            raise NotImplementedError(f"SDPAttention supports causal sliding windows (W - 1, 0) only, got {window}")
        self.window = None if window is None else window[0] + 1  # keys a query sees, itself included

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor attention bias; "
                                      "use model.transformer_impl='transformer_engine'")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        full_length = key.shape[0] * (self.cp_group.size() if self.cp_group is not None else 1)
        windowed = self.window is not None and self.window < full_length
        if self.cp_group is not None:
            if not causal or windowed:
                raise NotImplementedError("SDPAttention under context parallelism supports full causal attention only")
            return self._forward_cp(query, key, value)
        if windowed:  # an explicit mask: the band, and the document mask where there is one
            allowed = window_band(query.shape[0], key.shape[0], self.window, query.device)  # [sq, sk]
            if not causal:
                allowed = allowed & _as_sdpa_mask(attention_mask).bool()
            return self._attend(query, key, value, allowed, False)
        return self._attend(query, key, value, None if causal else _as_sdpa_mask(attention_mask), causal)

    def _attend(self, query, key, value, mask, causal: bool):
        """``[s, b, n, d]`` query/key/value -> ``[sq, b, np*d]``."""
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            # [b, ng, sk, d] -> [b, np, sk, d]; query head j attends with kv head j // groups.
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        dropout = self.attention_dropout.p if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                             scale=self.softmax_scale)
        ctx = ctx.permute(2, 0, 1, 3).contiguous()  # [b, np, sq, d] -> [sq, b, np, d]
        return ctx.view(ctx.size(0), ctx.size(1), self.hidden_size_per_partition)

    def _forward_cp(self, query, key, value):
        """Local chunks ``r`` and ``2 CP - 1 - r`` against the all-gathered keys and values."""
        group = self.cp_group
        cp_size, cp_rank = group.size(), group.rank()
        c = query.shape[0] // 2  # tokens per chunk
        kv = gather_from_sequence_parallel_region(torch.cat([key, value], dim=-1), True, group=group)
        kv = kv.view(2 * cp_size, c, *kv.shape[1:])[cp_sequence_order(cp_size)].flatten(0, 1)  # sequence order
        key, value = kv.split([key.shape[-1], value.shape[-1]], dim=-1)
        outs = []
        for half, g in enumerate((cp_rank, 2 * cp_size - 1 - cp_rank)):
            end = (g + 1) * c  # chunk g sees keys [0, end), its own chunk causally
            outs.append(self._attend(query[half * c:(half + 1) * c], key[:end], value[:end],
                                     causal_lower_right(c, end), False))
        return torch.cat(outs)


def window_band(sq: int, sk: int, window: int, device=None) -> torch.Tensor:
    """``[sq, sk]`` True where query i (the last sq of sk positions) may attend key j: i - window < j <= i."""
    q = torch.arange(sk - sq, sk, device=device).unsqueeze(1)  # [sq, 1] absolute query positions
    k = torch.arange(sk, device=device).unsqueeze(0)  # [1, sk]
    return (k <= q) & (k > q - window)


def _as_sdpa_mask(mask):
    """megatron masks are True where attention is *forbidden*; SDPA wants True where allowed."""
    if mask is None:
        return None
    return ~mask if mask.dtype == torch.bool else mask
