"""megatron-core DDP and optimizer from the config, and the learning-rate schedule.

The schedule is a pure function of the step (warmup, then cosine/linear decay to ``min_lr``),
applied to every parameter group with the group's ``lr_mult``/``wd_mult`` (megatron-core puts
these in each group). APEX operators are not model parameters: they have their own optimizer
(expansion/boundary.py), stepped with this schedule times ``apex.lr_scale``. Because it holds no
state beyond the step, resuming needs only the step, and ``finetune_from`` starts it at 0.
"""

from __future__ import annotations

import math

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer

from megatron_apex.config import Config


def wrap_ddp(cfg: Config, model: torch.nn.Module, transformer_config) -> DistributedDataParallel:
    """megatron-core DDP: contiguous gradient buffers, reduction over the data-parallel group."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        average_in_collective=False,
        # One bucket on the CPU keeps gloo traffic to a single all-reduce per step.
        bucket_size=None if torch.cuda.is_available() else 2 ** 62,
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


def lr_at(cfg: Config, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then decay to min_lr."""
    o = cfg.optimizer
    warmup = o.lr_warmup_steps
    if warmup > 0 and step < warmup:
        return o.lr * (step + 1) / warmup
    if o.lr_decay_style == "constant":
        return o.lr
    decay_steps = (o.lr_decay_steps or cfg.train.train_steps) - warmup
    if decay_steps <= 0:
        return o.min_lr
    progress = min(1.0, max(0.0, (step - warmup) / decay_steps))
    if o.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.min_lr + coeff * (o.lr - o.min_lr)


def apply_lr(cfg: Config, optimizer, step: int) -> float:
    """Set lr and weight decay of every parameter group for ``step``; returns the base lr."""
    lr = lr_at(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = cfg.optimizer.weight_decay * group.get("wd_mult", 1.0)
    return lr
