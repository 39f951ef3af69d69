"""RMSNorm for the local spec that also works under sequence parallelism.

megatron-core's local spec builds its norms through ``WrappedTorchNorm``, which refuses
``sequence_parallel`` (``transformer/torch_norm.py``). Nothing in an RMSNorm needs the whole
sequence: every token is normalized on its own, so a rank holding a slice of the sequence computes
its tokens exactly. What differs is the weight's gradient: each TP rank sees only its slice of the
tokens, so the per-rank gradients are partial sums. megatron-core already sums them over the TP group
(``finalize_model_grads``) for every parameter marked ``sequence_parallel``; this module marks its
weight. The module is ``torch.nn.RMSNorm`` otherwise (same parameter name, same arithmetic), so
checkpoints and numerics are those of the stock local spec.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with megatron-core's norm constructor, marked for sequence parallelism."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization != "RMSNorm":
            raise ValueError(f"megatron_apex RMSNorm: config.normalization is {config.normalization!r}, not 'RMSNorm'")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        # Read by megatron-core's finalize_model_grads: sum this weight's gradient over the TP group.
        self.weight.sequence_parallel = config.sequence_parallel
