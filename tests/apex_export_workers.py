"""Workers for the APEX export test (module-level so spawned processes can import them)."""

from __future__ import annotations

import torch


def step_batch_loss(checkpoint: str, config_path: str, overrides: list, step: int, fuse: bool = True) -> float:
    """Load ``checkpoint`` the way the exporter does (fused, TP=1) and return the mean loss of the
    global batch of training step ``step`` (the same samples the trainer used). ``fuse=False``
    loads the base weights alone (what an export that ignored the operators would hold); ``fuse="weights"``
    fuses the weights but leaves a QKV bias as stored (an export that forgot the bias)."""
    import megatron_apex.convert.exporter as exporter
    from megatron_apex.config import load_config
    from megatron_apex.convert.exporter import load_model, resolve_export_config
    from megatron_apex.convert.runtime import checkpoint_dtype, single_process
    from megatron_apex.data.datasets import build_datasets

    if not fuse:
        exporter._fuse_expansion_if_present = lambda model, *args: model
    elif fuse == "weights":
        fuse_all = exporter.fuse_expansion

        def fuse_weights(weights, *args):
            without_bias = {k: v for k, v in weights.items() if not k.endswith(".bias")}
            fused = fuse_all(without_bias, *args)
            weights.update(without_bias)
            return fused

        exporter.fuse_expansion = fuse_weights
    path, common, cfg, vocab, padded = resolve_export_config(checkpoint)
    with single_process(cfg) as ctx:
        model = load_model(path, common, cfg, padded, checkpoint_dtype(path), ctx)
        run_cfg = load_config(config_path, overrides)
        t = run_cfg.train
        train_ds, _ = build_datasets(run_cfg, vocab, run_cfg.data.eod_id, t.train_steps * t.global_batch_size, 0)
        losses = []
        with torch.no_grad():
            for start in range(step * t.global_batch_size, (step + 1) * t.global_batch_size, t.micro_batch_size):
                batch = [train_ds[i] for i in range(start, start + t.micro_batch_size)]
                tokens = torch.stack([b["tokens"] for b in batch])
                labels = torch.stack([b["labels"] for b in batch])
                pos = torch.stack([b["position_ids"] for b in batch])
                losses.append(model(tokens, pos, None, labels=labels).float().mean())
        return torch.stack(losses).mean().item()


def apex_callbacks(cfg):
    from megatron_apex.run import build_callbacks

    return build_callbacks(cfg)
