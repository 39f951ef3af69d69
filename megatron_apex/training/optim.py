"""megatron-core DDP and optimizer from the config, and the learning-rate schedule applied to them.

The schedule (schedule.py) is a pure function of the step, applied to every parameter group with the
group's ``lr_mult``/``wd_mult`` (megatron-core puts these in each group). APEX operators are not model parameters: they have their own optimizer
(expansion/boundary.py), stepped with this schedule times ``apex.lr_scale``. Because it holds no
state beyond the step, resuming needs only the step, and ``finetune_from`` starts it at 0.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer

from megatron_apex.config import Config
from megatron_apex.training.schedule import lr_at


def wrap_ddp(cfg: Config, model: torch.nn.Module, transformer_config) -> DistributedDataParallel:
    """megatron-core DDP: contiguous gradient buffers, reduction over the data-parallel group."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        average_in_collective=False,
        # One bucket on the CPU keeps gloo traffic to a single all-reduce per step.
        bucket_size=cfg.parallel.ddp_bucket_size or (None if torch.cuda.is_available() else 2 ** 62),
    )
    return DistributedDataParallel(config=transformer_config, ddp_config=ddp_config, module=model)


def build_optimizer(cfg: Config, model_chunks: list, params_dtype: torch.dtype):
    """AdamW through ``get_megatron_optimizer`` (distributed optimizer when configured)."""
    o = cfg.optimizer
    bf16 = params_dtype == torch.bfloat16
    mcfg = McoreOptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=bf16, params_dtype=params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    from megatron.core.optimizer import get_standard_config_overrides

    return get_megatron_optimizer(mcfg, model_chunks, config_overrides=get_standard_config_overrides(mcfg))


def apply_lr(cfg: Config, optimizer, step: int) -> float:
    """Set lr and weight decay of every parameter group for ``step``; returns the base lr."""
    lr = lr_at(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = cfg.optimizer.weight_decay * group.get("wd_mult", 1.0)
    return lr
