"""Multi-process workers of tests/test_convert.py (module-level so spawn can pickle them)."""

from __future__ import annotations

import copy
from functools import partial

import torch


def _gather_logits(ctx, output: torch.Tensor, non_loss_data: bool = False) -> torch.Tensor:
    """[b, s, Vp / tp] vocab-sharded logits -> full [b, s, Vp] (all-gather over the TP group)."""
    import torch.distributed as dist

    parts = [torch.empty_like(output) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, output.contiguous(), group=ctx.tp_group)
    return torch.cat(parts, dim=-1)


def _forward_step(ctx, data_iterator, model):
    tokens = next(data_iterator)
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    output = model(tokens, position_ids, None)
    return output, partial(_gather_logits, ctx)


def _loaded_forward(checkpoint: str, tokens: torch.Tensor, tp: int, pp: int):
    """Load an imported checkpoint under TP x PP and run one forward pass: (config, context, model, the
    checkpoint's common state, true vocab size, padded vocab size, the last stage's output)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_apex.convert.exporter import resolve_export_config
    from megatron_apex.distributed import initialize_distributed
    from megatron_apex.model.llama import build_model, build_transformer_config
    from megatron_apex.training.checkpoint import load_checkpoint

    path, common, cfg, vocab, padded = resolve_export_config(checkpoint)
    cfg = copy.deepcopy(cfg)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    ctx = initialize_distributed(cfg)
    tconfig = build_transformer_config(cfg, torch.float32, use_cpu=True)
    model = build_model(cfg, tconfig, padded, ctx.is_first_stage, ctx.is_last_stage)
    load_checkpoint(path, model, None, cfg, ctx, padded, load_optimizer=False, load_rng=False)
    model.eval()
    b, s = tokens.shape
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, ctx), data_iterator=iter([tokens]), model=[model],
            num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True, collect_non_loss_data=True)
    return cfg, ctx, model, common, vocab, padded, out


def load_and_forward(checkpoint: str, tokens: torch.Tensor, tp: int, pp: int):
    """Load an imported checkpoint under TP x PP and return the full logits from the last stage
    (TP rank 0); other ranks return None."""
    _, ctx, _, _, vocab, _, out = _loaded_forward(checkpoint, tokens, tp, pp)
    if ctx.is_last_stage and ctx.tp_rank == 0:
        return out[0][..., :vocab].clone()
    return None


def load_forward_and_save(checkpoint: str, tokens: torch.Tensor, tp: int, pp: int, out: str):
    """:func:`load_and_forward` under TP x PP, then save the loaded weights under that layout into ``out``
    (weights only, the import's record kept): a checkpoint written by TP/PP ranks, for the export."""
    import torch.distributed as dist

    from megatron_apex.training.checkpoint import save_checkpoint

    cfg, ctx, model, common, vocab, padded, logits = _loaded_forward(checkpoint, tokens, tp, pp)
    save_checkpoint(out, 0, model, None, cfg, ctx, padded, consumed_samples=0,
                    extra_common={"hf_import": common["hf_import"]})
    dist.barrier()
    return logits[0][..., :vocab].clone() if ctx.is_last_stage and ctx.tp_rank == 0 else None
