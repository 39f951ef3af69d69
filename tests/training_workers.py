"""Module-level (picklable) workers and small helpers for the engine tests.

Workers run inside ranks started by ``distributed_utils.run_distributed``; helpers for the
single-process tests run the trainer inside the pytest process itself (world size 1), which
saves the ~10 s of interpreter and torch start-up a spawned process costs on a small machine.
"""

from __future__ import annotations

import glob
import os

import torch


# ---------------------------------------------------------------------- multi-process workers
def _start_run(config_path: str, overrides: list):
    """(config, parallel context) of one of several runs in this rank: the layout may change between
    runs, so megatron-core's parallel state is torn down first."""
    from megatron.core import parallel_state as ps

    from megatron_apex.config import load_config
    from megatron_apex.distributed import initialize_distributed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    cfg = load_config(config_path, overrides)
    return cfg, initialize_distributed(cfg)


def train_many(config_path: str, runs: list) -> list:
    """Train each override list in turn in this rank; losses per run.

    Several runs (layouts) share one process start; each builds its own model, optimizer and
    data from scratch, so runs do not influence each other (the weights come from per-name
    generators, the data order from the global sample index).
    """
    from megatron_apex.training.trainer import Trainer

    out = []
    for overrides in runs:
        cfg, ctx = _start_run(config_path, overrides)
        result = Trainer(cfg, ctx).setup().train()
        out.append({"losses": dict(result.losses), "valid": dict(result.valid), "step": result.step,
                    "exit": result.exit_reason, "rank": ctx.rank})
    return out


def optimizer_shards(optimizer) -> dict:
    """This rank's optimizer state by position: the (fp32 main) parameters the optimizer steps and
    their Adam state (moments, step), cloned; with the distributed optimizer, this rank's shards."""
    out = {}
    for c, opt in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        inner = opt.optimizer
        for g, group in enumerate(inner.param_groups):
            for i, p in enumerate(group["params"]):
                out[f"{c}.{g}.{i}.param"] = p.detach().clone()
                for key, value in inner.state.get(p, {}).items():
                    out[f"{c}.{g}.{i}.{key}"] = value.detach().clone() if torch.is_tensor(value) else value
    return out


def _as_numpy(state: dict) -> dict:
    return {k: v.float().numpy() if torch.is_tensor(v) else v for k, v in state.items()}


def train_many_with_optimizer_state(config_path: str, runs: list) -> list:
    """Like :func:`train_many`, each run also reporting this rank's optimizer state after setup (as
    loaded, for a resumed run) and after training; a run whose setup refuses its checkpoint reports
    the CheckpointError's message under "refused" instead. The state comes back as numpy arrays (tensors
    would go through shared memory that a finished rank's exit takes away)."""
    from megatron_apex.training.checkpoint import CheckpointError
    from megatron_apex.training.trainer import Trainer

    out = []
    for overrides in runs:
        cfg, ctx = _start_run(config_path, overrides)
        try:
            trainer = Trainer(cfg, ctx).setup()
        except CheckpointError as exc:
            out.append({"refused": str(exc), "rank": ctx.rank})
            continue
        loaded = _as_numpy(optimizer_shards(trainer.optimizer))
        result = trainer.train()
        out.append({"losses": dict(result.losses), "step": result.step, "rank": ctx.rank, "loaded": loaded,
                    "trained": _as_numpy(optimizer_shards(trainer.optimizer))})
    return out


def train_and_evaluate(config_path: str, overrides: list) -> dict:
    """Train (saving a checkpoint at the end), then evaluate the final weights; per rank."""
    from megatron_apex.config import load_config
    from megatron_apex.distributed import initialize_distributed
    from megatron_apex.training.trainer import Trainer

    cfg = load_config(config_path, overrides)
    ctx = initialize_distributed(cfg)
    trainer = Trainer(cfg, ctx).setup()
    result = trainer.train()
    return {"losses": dict(result.losses), "eval": trainer.evaluate(), "checkpoint": result.checkpoint,
            "rank": ctx.rank}


def gathered_initial_weights(config_path: str, runs: list) -> list:
    """For each override list: build and initialise the model, gather every TP-sharded matrix.

    Returns per run ``{global name: full tensor}`` on the TP-rank-0 ranks (None elsewhere); PP
    stages each report their own layers under global layer numbers.
    """
    import torch.distributed as dist

    from megatron_apex.model.init import _global_name, _layer_offset, initialize_weights
    from megatron_apex.model.llama import build_model, build_transformer_config

    results = []
    for overrides in runs:
        cfg, ctx = _start_run(config_path, overrides)
        tconfig = build_transformer_config(cfg, torch.float32, use_cpu=True)
        model = build_model(cfg, tconfig, cfg.padded_vocab_size(), ctx.is_first_stage, ctx.is_last_stage)
        initialize_weights(model, cfg, ctx.tp_rank, ctx.tp_size)
        offset = _layer_offset(model)
        out = {}
        for name, p in model.named_parameters():
            full = p.detach().clone()
            if getattr(p, "tensor_model_parallel", False) and ctx.tp_size > 1:
                parts = [torch.empty_like(full) for _ in range(ctx.tp_size)]
                dist.all_gather(parts, full.contiguous(), group=ctx.tp_group)
                if name.endswith("mlp.linear_fc1.weight"):
                    # Each rank holds [gate_shard; up_shard]: reassemble [gate; up].
                    gates, ups = zip(*(t.chunk(2, dim=0) for t in parts))
                    full = torch.cat([*gates, *ups], dim=0)
                else:
                    full = torch.cat(parts, dim=p.partition_dim)
            out[_global_name(name, offset)] = full
        results.append(out if ctx.tp_rank == 0 else None)
    return results


# ---------------------------------------------------------------------- in-process (world size 1)
def stop_single_process() -> None:
    from megatron_apex.distributed import destroy_distributed

    destroy_distributed()


def trainer_in_process(config_path: str, overrides: list, callbacks=None):
    """A set-up Trainer in this process (distributed must be started with world size 1)."""
    from megatron_apex.config import load_config
    from megatron_apex.distributed import LaunchEnv, initialize_distributed
    from megatron_apex.training.trainer import Trainer

    torch.set_num_threads(1)  # the same arithmetic as a one-thread spawned rank
    cfg = load_config(config_path, overrides, world_size=1)
    from distributed_utils import free_port

    ctx = initialize_distributed(cfg, LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    return Trainer(cfg, ctx, callbacks).setup()


# ---------------------------------------------------------------------- reading results
def tensorboard_losses(event_file: str, tag: str = "train/loss") -> dict:
    """{step index (0-based): loss} from one TensorBoard event file (written at log_interval=1)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(event_file, size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return {}
    return {e.step - 1: e.value for e in acc.Scalars(tag)}


def event_files(directory: str) -> list:
    return sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*")))


def setup_error_and_scans(config_path: str, overrides: list) -> dict:
    """The ConfigError a trainer's set-up raises in this rank, and how many .bin scans this rank made."""
    from megatron_apex.config import ConfigError
    from megatron_apex.data import indexed
    from megatron_apex.training.trainer import Trainer

    scans = []
    original = indexed._bin_max.__wrapped__

    def counting(*args):
        scans.append(args[0])
        return original(*args)

    indexed._bin_max = counting
    cfg, ctx = _start_run(config_path, overrides)
    try:
        Trainer(cfg, ctx).setup()
    except ConfigError as exc:
        return {"error": str(exc), "scans": len(scans), "rank": ctx.rank}
    return {"error": None, "scans": len(scans), "rank": ctx.rank}


def publish_failure_worker(config_path: str, overrides: list, failing_rank: int, what: str) -> dict:
    """Save once with the publishing step failing on ``failing_rank`` (``what``: "move", rank 0's move into
    place, or "manifest", reading a rank's own files for the manifest); returns the error every rank
    raised and what is on disk."""
    from megatron_apex.training import checkpoint as ckpt
    from megatron_apex.training import integrity
    from megatron_apex.training.checkpoint_dir import CheckpointWriteError
    from megatron_apex.training.trainer import Trainer

    cfg, ctx = _start_run(config_path, overrides)
    trainer = Trainer(cfg, ctx, []).setup()
    if ctx.rank == failing_rank:
        def fail(*args, **kwargs):
            raise OSError(30, "Read-only file system (simulated)")
        if what == "move":
            ckpt.move_into_place = fail
        else:
            integrity._own_files = fail
    try:
        trainer.save()
        error = None
    except CheckpointWriteError as exc:
        error = str(exc)
    return {"rank": ctx.rank, "error": error, "listing": sorted(os.listdir(cfg.checkpoint.save))}
