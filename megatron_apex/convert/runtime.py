"""The single-process megatron-core set-up the converter needs: a TP=1/PP=1 CPU model.

torch_dist checkpoints hold global tensors, so one process at TP=1/PP=1 reads a checkpoint saved
under any layout and writes one that loads under any layout (megatron-core reshards on load).
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch

from megatron_apex.config import Config
from megatron_apex.convert.mapping import ConversionError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def single_process(cfg: Config):
    """Yield a ParallelContext for one process; tears it down only if it started it here.

    The process joins no launcher's job: a torchrun, slurm or MPI environment around it (the
    converter run inside an allocation) must not turn this into a rendezvous with ranks that never
    come, so the launch environment is that of a process started without any launcher."""
    import torch.distributed as dist

    from megatron_apex.compat.cpu import apply_cpu_patches
    from megatron_apex.distributed import destroy_distributed, detect_launch_env, initialize_distributed

    started = not dist.is_initialized()
    try:
        apply_cpu_patches()  # without CUDA: megatron-core's CUDA assumptions redirected (docs/cpu.md)
        ctx = initialize_distributed(cfg, detect_launch_env({}))
        if ctx.world_size != 1 and ctx.tp_size * ctx.pp_size != 1:
            raise ConversionError("the converter runs in a single process (TP=1, PP=1); run it without torchrun")
        yield ctx
    finally:
        if started:
            destroy_distributed()


def single_layout(cfg: Config) -> Config:
    """A copy of ``cfg`` at TP=1/PP=1/CP=1 on the local implementation (how the converter holds a model)."""
    c = copy.deepcopy(cfg)
    p = c.parallel
    p.tensor_model_parallel_size = p.pipeline_model_parallel_size = p.context_parallel_size = 1
    p.sequence_parallel = False
    p.use_distributed_optimizer = False
    p.backend = "auto"
    c.train.recompute_activations, c.train.recompute_num_layers, c.train.recompute_core_attention = False, None, False
    # The local spec's norms are stored under the Transformer Engine names
    # (linear_qkv.layer_norm_weight, linear_fc1.layer_norm_weight), so either implementation's
    # checkpoint loads into the local model; the local one runs everywhere.
    c.model.transformer_impl = "local"
    return c


def build_cpu_model(cfg: Config, dtype: torch.dtype, padded_vocab: int, initialize: bool = False):
    """The whole model as one megatron-core GPTModel on the CPU, in ``dtype``. Without ``initialize``
    the parameters are left uninitialised (the converter overwrites every one of them)."""
    from megatron_apex.model.llama import build_model, build_transformer_config

    tconfig = build_transformer_config(cfg, dtype, use_cpu=True)
    tconfig.perform_initialization = initialize
    model = build_model(cfg, tconfig, padded_vocab, pre_process=True, post_process=True)
    model.eval()
    return model


def checkpoint_dtype(path: str) -> torch.dtype:
    """The dtype the model weights are stored in (read from the torch_dist metadata, no tensors)."""
    from megatron_apex.training.integrity import read_metadata

    meta = read_metadata(path).state_dict_metadata
    for key in ("model.embedding.word_embeddings.weight", "embedding.word_embeddings.weight"):
        if key in meta:
            return meta[key].properties.dtype
    dtypes = {m.properties.dtype for k, m in meta.items() if hasattr(m, "properties") and k.startswith("model.")}
    if len(dtypes) == 1:
        return dtypes.pop()
    raise ConversionError(f"{path}: cannot tell the weights' dtype from the checkpoint metadata")
