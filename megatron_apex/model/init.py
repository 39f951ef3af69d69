"""Layout-independent weight initialisation.

megatron-core draws initial weights from a generator whose stream depends on how many layers and
shards a rank builds, so TP=2 or PP=2 would start from different weights than TP=1, and data-parallel
replicas would differ unless broadcast. We instead draw every *global* tensor from its own generator,
seeded by (train.seed, global parameter name), and keep this rank's shard. Every parallel layout
therefore starts from bit-identical weights, which is what makes layout-parity tests meaningful and
lets a run change its layout without changing its mathematics.
"""

from __future__ import annotations

import math
import re
import zlib

import torch

from megatron_apex.config import Config
from megatron_apex.model.sharding import tp_shard

# RowParallel projections whose output joins the residual stream: N(0, std / sqrt(2 * layers)).
_SCALED = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_LAYER = re.compile(r"^(.*decoder\.layers\.)(\d+)(\..*)$")


def _global_name(name: str, offset: int) -> str:
    m = _LAYER.match(name)
    return f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}" if m else name


def _layer_offset(model: torch.nn.Module) -> int:
    """Global index of this pipeline stage's first layer."""
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0:
        return 0
    return layers[0].layer_number - 1


def _full_shape(param: torch.Tensor, tp_size: int) -> tuple:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


@torch.no_grad()
def initialize_weights(model: torch.nn.Module, cfg: Config, tp_rank: int, tp_size: int) -> None:
    """Draw every matrix of ``model`` (one pipeline stage's chunk) from a per-name generator.

    One-dimensional parameters (norm scales) keep their module initialisation (ones).
    """
    std = cfg.model.init_method_std
    scaled_std = std / math.sqrt(2.0 * cfg.model.num_layers)
    offset = _layer_offset(model)
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue
        global_name = _global_name(name, offset)
        if cfg.model.tie_embeddings and global_name == "output_layer.weight":
            global_name = "embedding.word_embeddings.weight"  # the last stage's copy of the tied weight
        seed = (cfg.train.seed * 1_000_003 + zlib.crc32(global_name.encode())) % (2 ** 63)
        gen = torch.Generator().manual_seed(seed)
        sigma = scaled_std if global_name.endswith(_SCALED) else std
        full = torch.empty(_full_shape(param, tp_size), dtype=torch.float32).normal_(0.0, sigma, generator=gen)
        if getattr(param, "tensor_model_parallel", False):
            # SwiGLU fc1: the global tensor is [gate; up]; a rank holds [gate_shard; up_shard].
            full = tp_shard(full, param.partition_dim, tp_rank, tp_size, swiglu=name.endswith("mlp.linear_fc1.weight"))
        param.copy_(full.to(param.dtype))
