"""Checkpoints with megatron-core dist_checkpointing (torch_dist), resharding across layouts.

Layout (compatible with Megatron-LM's)::

    <root>/latest_checkpointed_iteration.txt   written last, atomically, after every rank finished
    <root>/iter_0000100/                       torch_dist shards + common state (metadata.json last)

The common state holds the step, consumed samples, the resolved config, the parallel layout it
was saved under, and a *model signature* (every shape-defining field, RoPE theta and the RMSNorm
epsilon). Loading compares the signature with the current model and refuses a mismatch with the
list of differing fields. Model weights (and the plain optimizer's state) are stored as global
tensors, so they load under any TP/PP layout; the distributed optimizer's state is stored in one of
two formats (``checkpoint.optimizer_format``, recorded in the common state, see
:func:`optimizer_metadata`); RNG states are per (PP, TP) rank and are restored only when the layout
is unchanged.

A save writes into ``<root>/saving.iter_0000100/`` and renames it into place once every rank has
finished, before the tracker moves: a crash during a save leaves the tracker and the checkpoint it
names untouched, and the next save removes the leftover ``saving.*`` directory.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_apex.compat import safe_load
from megatron_apex.config import Config
from megatron_apex.distributed import ParallelContext
from megatron_apex.training.integrity import record_manifest

logger = logging.getLogger(__name__)
safe_load.install()  # reading a checkpoint never runs code from it

TRACKER = "latest_checkpointed_iteration.txt"
COMPLETE_MARKER = "metadata.json"  # megatron-core's dist_checkpointing writes it after all shards
SAVING_PREFIX = "saving."      # a save in progress (or interrupted): never read, removed by the next save
REPLACED_PREFIX = "replaced."  # an earlier save of the same step, moved aside while the new one moves in
FORMAT_VERSION = 1
SIGNATURE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "query_groups",
                    "head_dim", "tie_embeddings", "rotary_base", "norm_epsilon",
                    "rope_scaling_factor")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used with the current configuration (the message says why)."""


class CheckpointWriteError(CheckpointError):
    """A save could not write its files (disk full, quota, file size limit); the staging directory is gone
    and the previous checkpoint is untouched. The run exits with :data:`EXIT_WRITE_FAILED`."""


EXIT_WRITE_FAILED = 74  # sysexits' EX_IOERR


def iter_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def _iter_step(name: str) -> Optional[int]:
    """The step of an ``iter_NNNNNNN`` directory name (None for any other name)."""
    return int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else None


def is_complete(path: str) -> bool:
    """Whether ``path`` is a checkpoint directory whose save finished."""
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def read_latest(root: Optional[str]) -> Optional[int]:
    """Step of the newest complete checkpoint under ``root`` (None if there is none)."""
    if not root:
        return None
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path, encoding="utf-8").read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}")
    step = int(text)
    target = iter_dir(root, step)
    if not os.path.isdir(target):
        replaced = os.path.join(root, REPLACED_PREFIX + os.path.basename(target))
        hint = (f"; {replaced} holds it (a save of the same step was interrupted): rename it back"
                if os.path.isdir(replaced) else "")
        raise CheckpointError(f"{path} names step {step} but {target} does not exist{hint}")
    if not is_complete(target):
        raise CheckpointError(f"{path} names step {step} but {target} is incomplete (no {COMPLETE_MARKER}: an "
                              f"interrupted save); write the step of an earlier complete checkpoint into {path}")
    return step


def _complete_steps(root: str) -> list:
    """Steps of the complete ``iter_*`` directories under ``root``, newest first."""
    steps = [_iter_step(name) for name in os.listdir(root)]
    return sorted((s for s in steps if s is not None and is_complete(iter_dir(root, s))), reverse=True)


def has_checkpoint(root: Optional[str]) -> bool:
    """Whether ``root`` holds a checkpoint to resume from: a tracker, or a complete ``iter_*`` directory
    (a tracker lost or deleted must not make a run start again from step 0 over its checkpoints)."""
    return bool(root) and os.path.isdir(root) and (os.path.isfile(os.path.join(root, TRACKER))
                                                   or bool(_complete_steps(root)))


def resolve_checkpoint_dir(path: str, name: Optional[str] = None, checksums: bool = False) -> str:
    """The intact checkpoint directory ``path`` names: an ``iter_*`` directory, or a root's newest intact
    checkpoint (integrity.checkpoint_problem; ``checksums`` also compares every file's CRC-32 with what
    the save recorded, else sizes only).

    A root whose tracker names a damaged, incomplete or missing checkpoint, or that has lost its
    tracker, falls back to its newest intact ``iter_*`` directory, with a warning that says why.
    Raises :class:`CheckpointError` when there is no such directory, it holds no checkpoint, an
    ``iter_*`` directory given by name is damaged, or nothing under a root is intact; the message
    starts with ``name=path`` when the path comes from a config field ``name``."""
    where = f"{name}={path!r}" if name else path
    try:
        return _resolve_intact(path, where, checksums)
    except safe_load.UnsafeFileError as exc:  # refused outright: a tampered directory is not one to fall back in
        raise CheckpointError(str(exc)) from None


def _resolve_intact(path: str, where: str, checksums: bool) -> str:
    from megatron_apex.training.integrity import checkpoint_problem

    if not os.path.isdir(path):
        raise CheckpointError(f"{where}: no such checkpoint directory")
    if is_complete(path):
        problem = checkpoint_problem(path, checksums)
        if problem:
            raise CheckpointError(f"{where}: damaged checkpoint: {problem}")
        return path
    if not has_checkpoint(path):
        what = (f"an incomplete checkpoint (no {COMPLETE_MARKER}: an interrupted save)"
                if _iter_step(os.path.basename(os.path.normpath(path))) is not None
                else f"neither a checkpoint directory nor a root with {TRACKER}")
        if os.path.isfile(os.path.join(path, "config.json")) and any(
                name.endswith(".safetensors") for name in os.listdir(path)):
            what += (f"; this is a Hugging Face model: convert it first with tools/convert_checkpoint.py import "
                     f"--hf-dir {path} --output CHECKPOINT_DIR, and give CHECKPOINT_DIR")
        raise CheckpointError(f"{where}: {what}")
    problems = []
    try:
        latest = read_latest(path)
    except CheckpointError as exc:  # the tracker names an incomplete or missing directory
        latest, problems = None, [str(exc)]
    if latest is None and not problems:
        problems.append(f"{os.path.join(path, TRACKER)} is missing")
    candidates = ([latest] if latest is not None else []) + [s for s in _complete_steps(path) if s != latest]
    for step in candidates:
        target = iter_dir(path, step)
        problem = checkpoint_problem(target, checksums)
        if problem is None:
            if problems:
                logger.warning("%s: %s; using the newest intact checkpoint, %s", where, "; ".join(problems), target)
            return target
        problems.append(f"{target} is damaged ({problem})")
    raise CheckpointError(f"{where}: no intact checkpoint: " + "; ".join(problems))


def resume_source(cfg: Config, checksums: bool = True) -> tuple[Optional[str], Optional[str], str]:
    """(the configured path to resume from, the checkpoint directory it names; why that one), or Nones
    when there is nothing to resume from. The trainer and the dry run both ask this, so that a plan
    that passes the dry run is not refused by the run over these paths.

    checkpoint.save wins once it has a checkpoint: it holds this run's newest state, so a
    resubmitted job continues from where the last one stopped rather than from checkpoint.load.
    An explicit checkpoint.load must hold a checkpoint (checkpoint.load = checkpoint.save is the
    usual auto-resume and may be empty). The directory returned is intact (:func:`resolve_checkpoint_dir`,
    ``checksums`` as there)."""
    c = cfg.checkpoint
    explicit_load = bool(c.load) and not (c.save and os.path.realpath(c.load) == os.path.realpath(c.save))
    if has_checkpoint(c.save):
        return c.save, resolve_checkpoint_dir(c.save, "checkpoint.save", checksums), (
            "checkpoint.save holds this run's newest checkpoint"
            + (f"; checkpoint.load={c.load} is only used before it has one" if explicit_load else ""))
    if explicit_load:
        return c.load, resolve_checkpoint_dir(c.load, "checkpoint.load", checksums), (
            "checkpoint.load" + (f"; checkpoint.save={c.save} has no checkpoint yet" if c.save else ""))
    return None, None, ""


def model_signature(cfg: Config, padded_vocab: int) -> dict:
    sig = {name: getattr(cfg.model, name) for name in SIGNATURE_FIELDS}
    sig["padded_vocab_size"] = padded_vocab
    return sig


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _params_dtype(model) -> str:
    """The dtype of the model's weights ("bfloat16", "float32"): train.precision as the run resolved it."""
    return str(next(unwrap(model).parameters()).dtype).replace("torch.", "")


def _saved_params_dtype(common: dict) -> Optional[str]:
    dtype = common.get("params_dtype")
    if dtype is None:  # written before the field: the configured precision, unless it was "auto"
        dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(common.get("config", {}).get("train", {}).get("precision"))
    return dtype


def _layout(ctx: ParallelContext) -> dict:
    return {"tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size, "cp": ctx.cp_size}


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers: checkpoint keys never depend on wrapping."""
    while hasattr(model, "module"):
        model = model.module
    return model


# How the distributed optimizer's state is stored (megatron-core's ``distrib_optim_sharding_type``).
#
# - "dp_reshardable" (the default): every rank writes its own shard of the flat optimizer buffers as it
#   is, keyed by position in the (TP, PP) rank's gradient buffer. Saving and loading are fully parallel,
#   with no communication and no memory beyond the sharded state itself: the point of the distributed
#   optimizer. Since the buffer positions depend on which parameters the (TP, PP) rank holds, the state
#   reshards across DP (and CP, which the optimizer shards over together with DP) only; a change of TP or
#   PP is refused (see check_optimizer_state).
# - "fully_reshardable": each save gathers the whole optimizer state of the (TP, PP) rank over the
#   data-parallel group and stores it per parameter like the plain optimizer, so it loads under any
#   TP/PP/DP; but every save holds the unsharded state in memory (12 bytes a parameter of the model
#   shard) and every load reads it whole on each rank, exactly what ZeRO-1 is used to avoid. Chosen
#   explicitly before a change of TP/PP.
#
# megatron-core's own default (no ``metadata``) is the deprecated "fully_sharded_model_space", which
# needs ShardedTensor.flattened_range, which its checkpoint strategies no longer support.
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")
PLAIN_OPTIMIZER = "plain"  # the common state's optimizer_format of a non-distributed optimizer


def optimizer_metadata(fmt: Optional[str]) -> dict:
    """The ``metadata`` of ``optimizer.sharded_state_dict`` for a checkpoint's optimizer format."""
    if fmt is None or fmt == PLAIN_OPTIMIZER:
        return {}
    if fmt not in OPTIMIZER_FORMATS:
        raise CheckpointError(f"unknown distributed optimizer format {fmt!r} (this version reads "
                              f"{', '.join(OPTIMIZER_FORMATS)})")
    # chained_optim_avoid_prefix: with several chained optimizers, their dp_reshardable keys get a prefix
    # (their buffers would collide otherwise), the per-parameter keys of fully_reshardable do not.
    return {"distrib_optim_sharding_type": fmt,
            "distrib_optim_fully_reshardable_mem_efficient": fmt == "fully_reshardable",
            "chained_optim_avoid_prefix": True}


def _optimizer_format(cfg: Config) -> str:
    return cfg.checkpoint.optimizer_format if cfg.parallel.use_distributed_optimizer else PLAIN_OPTIMIZER


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]


def _init_distributed_optimizer_state(optimizer) -> None:
    """Give the distributed optimizer's inner optimizer its per-parameter state before a load.

    torch's Adam (megatron-core's choice without Transformer Engine or NVIDIA apex) creates
    ``exp_avg``, ``exp_avg_sq`` and ``step`` at its first step; before that, megatron-core's
    ``DistributedOptimizer.state_dict`` (which building the load state dict calls) finds no step, and
    its ``load_state_dict`` would allocate the state on a CUDA device. Zero moments and step 0 are
    created here (as the optimizer's own ``init_state_fn`` does for the moments, plus the step), for
    the loaded values to be copied into; nothing is stepped, so the weights are untouched. Fused Adams
    keep their step per group and allocate their state themselves: left alone."""
    for dist_opt in _torch_adam_optimizers(optimizer):
        inner = dist_opt.optimizer
        if len(inner.state) > 0:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _torch_adam_optimizers(optimizer) -> list:
    """The distributed optimizers whose inner optimizer is torch's Adam (no Transformer Engine or NVIDIA
    apex): those whose checkpoint loads need the workarounds here."""
    adams = (torch.optim.Adam, torch.optim.AdamW)
    return [o for o in _distributed_optimizers(optimizer) if isinstance(o.optimizer, adams)]


def _load_optimizer_state(optimizer, state) -> None:
    """``optimizer.load_state_dict(state)``, working around megatron-core's fully_reshardable load
    with torch's Adam: ``load_parameter_state_from_fully_reshardable`` copies every per-parameter state
    of the optimizer from the loaded tensors, "step" included, but the loaded tensors have no "step"
    (it is saved with the parameter groups), a KeyError. So the parameter groups (and the step) are
    loaded first, then the parameter state with the per-parameter steps set aside."""
    torch_adams = _torch_adam_optimizers(optimizer)
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state] if len(chained) == 1 else [v for _, v in sorted(state.items())]

    def split_load(opt, st) -> bool:
        return opt in torch_adams and st.get("param_state_sharding_type") == "fully_reshardable"

    if not any(split_load(opt, st) for opt, st in zip(chained, states)):
        optimizer.load_state_dict(state)
        return
    if len(chained) != len(states):
        raise CheckpointError(f"the checkpoint holds the state of {len(states)} optimizers, this run has "
                              f"{len(chained)}")
    for opt, st in zip(chained, states):
        if not split_load(opt, st):
            opt.load_state_dict(st)
            continue
        param_state = st["param_state"]
        opt.load_state_dict({k: v for k, v in st.items() if k not in ("param_state", "param_state_sharding_type")})
        inner = opt.optimizer
        steps = {p: s.pop("step") for p, s in inner.state.items() if "step" in s}
        try:
            opt.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for p, step in steps.items():
                inner.state[p]["step"] = step
    if len(chained) > 1 and hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()  # as ChainedOptimizer.load_state_dict does


def _restore_adam_steps(optimizer) -> None:
    """Give torch Adam's per-parameter ``step`` the loaded value, one tensor per parameter.

    megatron-core's ``DistributedOptimizer.load_state_dict`` puts the saved step into each parameter
    group and one tensor holding it into every parameter's state, then loads the parameter state,
    whose dp_reshardable form carries each parameter's step *as it was before the load* (not saved):
    that copy puts the step back to 0, and Adam's bias correction restarts. And torch's Adam
    increments each parameter's step in place, so one tensor shared by all of them would advance by
    the number of parameters at every step. The group's step is the loaded one: set again here."""
    for dist_opt in _torch_adam_optimizers(optimizer):
        inner = dist_opt.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                if "step" in inner.state.get(p, {}):
                    inner.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def _drop_empty_param_state(state) -> None:
    """fully_reshardable saves gather the parameter state on DP rank 0; the other DP ranks' state dicts
    hold ``param_state=None``, which is not saved (it would only make the common state differ from
    rank 0's, a warning at every save)."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

    if isinstance(state, dict):
        if "param_state_sharding_type" in state and state.get("param_state") is None:
            state["param_state"] = LocalNonpersistentObject(None)
        for value in state.values():
            _drop_empty_param_state(value)


def build_state_dict(model, optimizer, ctx: ParallelContext, is_loading: bool, with_optimizer: bool,
                     with_rng: bool, extra_sharded: Optional[dict] = None,
                     optimizer_format: Optional[str] = None) -> dict:
    """The sharded state dict of model (+ optimizer, RNG, extra sharded state).

    ``optimizer_format``: how the distributed optimizer's state is (or was) stored, one of
    ``OPTIMIZER_FORMATS`` (ignored for the plain optimizer)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    sd = {"model": unwrap(model).sharded_state_dict()}
    if with_optimizer:
        if is_loading:
            _init_distributed_optimizer_state(optimizer)
        fmt = optimizer_format if _distributed_optimizers(optimizer) else None
        sd["optimizer"] = optimizer.sharded_state_dict(sd["model"], is_loading=is_loading,
                                                       metadata=optimizer_metadata(fmt))
        if not is_loading and fmt == "fully_reshardable":
            _drop_empty_param_state(sd["optimizer"])
    if with_rng:
        sd["rng_state"] = ShardedObject("rng_state", _rng_state(), (ctx.pp_size, ctx.tp_size),
                                        (ctx.pp_rank, ctx.tp_rank), replica_id=ctx.dp_rank * ctx.cp_size + ctx.cp_rank)
    if extra_sharded:
        sd.update(extra_sharded)
    return sd


def save_checkpoint(root: str, step: int, model, optimizer, cfg: Config, ctx: ParallelContext,
                    padded_vocab: int, consumed_samples: int, extra_common: Optional[dict] = None,
                    extra_sharded: Optional[dict] = None) -> str:
    """Save on every rank; the tracker is updated by rank 0 only after all ranks finished.

    ``optimizer=None`` writes a weights-only checkpoint (e.g. an imported Hugging Face model), which
    can initialise a run through ``checkpoint.finetune_from`` but not resume one.
    """
    from megatron.core import dist_checkpointing

    target = iter_dir(root, step)
    staging = os.path.join(root, SAVING_PREFIX + os.path.basename(target))
    _start_writer_results_queue()
    if ctx.rank == 0:
        os.makedirs(root, exist_ok=True)
        _remove_leftovers(root)
        os.makedirs(staging)
    dist.barrier()
    optimizer_format = _optimizer_format(cfg) if optimizer is not None else None
    sd = build_state_dict(model, optimizer, ctx, is_loading=False, with_optimizer=optimizer is not None,
                          with_rng=True, extra_sharded=extra_sharded, optimizer_format=optimizer_format)
    sd.update({"format_version": FORMAT_VERSION, "step": step, "consumed_samples": consumed_samples,
               "has_optimizer": optimizer is not None, "optimizer_format": optimizer_format,
               "params_dtype": _params_dtype(model),
               "config": cfg.to_dict(), "layout": _layout(ctx),
               "model_signature": model_signature(cfg, padded_vocab), **(extra_common or {})})
    _share_cpu_slices(sd)
    need = _expected_size(root, sd)
    free = shutil.disk_usage(root).free
    if ctx.rank == 0 and free < need:
        logger.warning("%s: %.2f GiB free, and a checkpoint takes about %.2f GiB: this save (step %d) will probably "
                       "fail", root, free / 2**30, need / 2**30, step)
    writers = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    level = writers.level
    writers.setLevel(logging.CRITICAL)  # a writer's failure is reported once, below, with what to do
    try:
        dist_checkpointing.save(sd, staging)
    except BaseException as exc:  # torch's CheckpointException is a BaseException; its errors lose the errno
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        shutil.rmtree(staging, ignore_errors=True)  # its space back at once; the tracker's checkpoint untouched
        free = shutil.disk_usage(root).free
        what = (f"no space left on the device ({free / 2**30:.2f} GiB free, a checkpoint takes about "
                f"{need / 2**30:.2f} GiB)" if free < need else _write_failure(exc))
        latest = read_latest(root)
        raise CheckpointWriteError(f"could not write the checkpoint of step {step} into {root}: {what}; the "
                                   f"staging directory was removed, "
                                   + (f"the last checkpoint (step {latest}) is intact" if latest is not None
                                      else "no earlier checkpoint exists") + f" (exit code {EXIT_WRITE_FAILED})"
                                   ) from None
    finally:
        writers.setLevel(level)
    dist.barrier()
    record_manifest(staging, ctx.rank, ctx.world_size)  # what the save wrote, checked before every load
    if ctx.rank == 0:
        _move_into_place(staging, target)
        _write_atomic(os.path.join(root, TRACKER), f"{step}\n")
        if cfg.checkpoint.keep_last:
            _prune(root, cfg.checkpoint.keep_last, step)
    dist.barrier()
    logger.info("saved checkpoint %s", target)
    return target


def _write_failure(exc: BaseException) -> str:
    """The reason a save failed, in words: torch's writers report a short write as "unexpected pos"."""
    failures = getattr(exc, "failures", None)
    inner = next(iter(failures.values()))[0] if isinstance(failures, dict) and failures else exc
    text = (str(inner).strip().splitlines() or [type(inner).__name__])[-1][:200]
    if "unexpected pos" in text or isinstance(inner, OSError):
        return f"a file could not be written in full (disk full, quota or file size limit; {text})"
    return f"{type(inner).__name__}: {text}"


def _expected_size(root: str, sd: dict) -> int:
    """Bytes a save is expected to take: the newest checkpoint's files, else this rank's tensors times the
    number of ranks (an estimate, for the free-space warning and the disk-full message)."""
    latest = read_latest(root) if os.path.isfile(os.path.join(root, TRACKER)) else None
    if latest is not None:
        path = iter_dir(root, latest)
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    total = 0

    def visit(x):
        nonlocal total
        if isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)
        elif isinstance(x, ShardedTensor) and x.replica_id in (0, (0, 0, 0)) and x.data is not None:
            total += x.data.numel() * x.data.element_size()
        elif isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()

    visit(sd)
    return total * (dist.get_world_size() if dist.is_initialized() else 1)


def _start_writer_results_queue() -> None:
    """Start megatron-core's checkpoint-writer results queue out of reach of the job's stop signals.

    The torch_dist writer returns its results through a multiprocessing manager that megatron-core
    spawns on the first save. slurm and torchrun deliver SIGTERM (and slurm's ``--signal=USR1``) to
    the whole process group: the manager, whose default is to die of them, would be gone by the time
    the trainer writes the checkpoint the signal asks for, and that save would fail. So the same
    manager is started here, first thing in its process blocking those signals and SIGINT (the trainer
    handles them); it still stops when this process exits (a shutdown message, then SIGKILL), and on Linux
    when this process dies without exiting (SIGKILL, the OOM killer), instead of staying orphaned."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_apex.compat.process import helper_init

    if getattr(filesystem_async, "_results_queue", True) is not None:  # running (or another version)
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    # The manager never acts on SIGINT: the trainer does (a Ctrl-C reaches the whole process group), and
    # the manager dies with it. Blocked here while it starts, SIGINT stays blocked in the child (it
    # inherits the mask) through its bootstrap too, before it ignores SIGINT as every manager does.
    blocked = frozenset({signal.SIGTERM, signal.SIGUSR1, signal.SIGINT})
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        manager.start(helper_init, (os.getpid(), blocked))
    except BaseException:
        # The second Ctrl-C (which aborts) often arrives while the first one's save starts the manager:
        # the handshake is cut, and the manager, left to itself, died with a "Process SyncManager-1: ...
        # BrokenPipeError" traceback (or, alive, kept this process waiting for it at exit). End it quietly.
        process = getattr(manager, "_process", None)
        if process is not None and process.is_alive():
            process.kill()
            process.join()
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    filesystem_async._results_queue = manager.Queue()  # the queue keeps its manager alive


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """A tensor on the same memory as the contiguous CPU tensor ``t`` whose storage is exactly ``t``'s
    bytes (no copy): ``torch.from_numpy`` wraps the numpy view of those bytes in a storage of its own."""
    raw = torch.from_numpy(t.detach().reshape(-1).view(torch.uint8).numpy())
    return raw.view(t.dtype).view(t.shape)


def _share_cpu_slices(sd: dict) -> None:
    """Let the torch_dist writer save CPU slices of larger tensors without copying them first.

    The writer clones every CPU tensor that is a slice of a larger storage (``torch.save`` would
    otherwise write the whole storage), and it does so for all tensors before writing any: with
    SwiGLU each ``linear_fc1.weight`` is saved as two halves, so a CPU save held a second copy of
    every fc1 weight (1.9 GiB for a 1.1B LLaMA). Giving each contiguous slice a storage of its own
    over the same memory writes the same bytes with no copy. Factories are applied here (the
    save applies them first anyway) so that their slices are seen; GPU tensors are left alone."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    def share(x):
        t = x.data if isinstance(x, ShardedTensor) and x.flattened_range is None else None
        if (t is not None and t.device.type == "cpu" and t.numel() and t.is_contiguous()
                and t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            x.data = _own_storage(t)
        return x

    apply_factories(sd)
    dict_list_map_inplace(share, sd)


def _merge_in_place(sd: dict) -> None:
    """Skip the copy that merging a factory's loaded pieces makes when they were loaded in place.

    A factory (SwiGLU's fc1 halves) hands the loader views of the model's tensor; the loader fills
    those views in place, and the merge then concatenates them into a new tensor, which for a CPU
    model held a second copy of every fc1 weight until the state dict was applied. When the loaded
    pieces are exactly consecutive views tiling the factory's tensor, that tensor already holds the
    merged value (the merge is the inverse of the split), so it is returned as is; anything else
    goes through the factory's own merge."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    def in_place(merge, whole):
        def merge_fn(pieces):
            return whole if _tiles(pieces, whole) else merge(pieces)
        return merge_fn

    for factory in nested_values(sd):
        if isinstance(factory, ShardedTensorFactory):
            factory.merge_fn = in_place(factory.merge_fn, factory.data)


def _tiles(pieces, whole) -> bool:
    """Whether ``pieces`` are contiguous views of the contiguous ``whole``, back to back in order."""
    if not (isinstance(pieces, list) and pieces and isinstance(whole, torch.Tensor) and whole.is_contiguous()):
        return False
    ptr = whole.data_ptr()
    for t in pieces:
        if not (isinstance(t, torch.Tensor) and t.is_contiguous() and t.dtype == whole.dtype
                and t.device == whole.device and t.data_ptr() == ptr):
            return False
        ptr += t.numel() * t.element_size()
    return ptr == whole.data_ptr() + whole.numel() * whole.element_size()


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _fsync_dir(path: str) -> None:
    """Make renames in directory ``path`` durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_leftovers(root: str) -> None:
    """Remove what interrupted saves left (never a directory the tracker can name)."""
    for name in os.listdir(root):
        if name.startswith((SAVING_PREFIX, REPLACED_PREFIX)) and os.path.isdir(os.path.join(root, name)):
            logger.warning("removing %s, left by an interrupted save", os.path.join(root, name))
            shutil.rmtree(os.path.join(root, name))


def _move_into_place(staging: str, target: str) -> None:
    """Rename the finished ``staging`` directory to ``target``.

    An existing ``target`` is either a leftover the tracker does not name (a save that ended before
    the tracker moved, or an interrupted save of an older version), or the tracker's own checkpoint
    saved again (e.g. fused at the end of a run resumed at its last step): it is moved aside first
    and deleted only once the new directory is in place."""
    root = os.path.dirname(target)
    replaced = os.path.join(root, REPLACED_PREFIX + os.path.basename(target))
    if os.path.isdir(target):
        os.rename(target, replaced)
    os.rename(staging, target)
    _fsync_dir(root)
    if os.path.isdir(replaced):
        shutil.rmtree(replaced)


def _prune(root: str, keep: int, saved: int) -> None:
    """checkpoint.keep_last: keep the newest ``keep`` complete checkpoints up to ``saved`` (the step
    just saved, which the tracker names). Incomplete directories and steps newer than ``saved`` (left
    by an earlier run that went further) are neither counted nor deleted."""
    complete, newer, incomplete = [], [], []
    for name in os.listdir(root):
        step = _iter_step(name)
        if step is None:
            continue
        if step > saved:
            newer.append(name)
        elif not is_complete(os.path.join(root, name)):
            incomplete.append(name)
        else:
            complete.append(step)
    for step in sorted(complete)[:-keep]:
        shutil.rmtree(iter_dir(root, step), ignore_errors=True)
    if newer:
        logger.warning("%s: %s newer than the step just saved (%d), left by an earlier run; checkpoint.keep_last "
                       "does not delete them", root, ", ".join(sorted(newer)), saved)
    if incomplete:
        logger.warning("%s: %s incomplete (no %s: an interrupted save); checkpoint.keep_last neither counts nor "
                       "deletes them", root, ", ".join(sorted(incomplete)), COMPLETE_MARKER)


def read_common(path: str) -> dict:
    """The non-tensor state of a checkpoint (step, config, signature...), without loading tensors."""
    import pickle

    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) refused it
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{os.path.join(path, 'common.pt')}: refusing to read it: not plain checkpoint data "
                              f"({first[:200]})") from None
    if common.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {common.get('format_version')!r}, this "
                              f"version of megatron-apex reads {FORMAT_VERSION}")
    return common


def load_sharded(sd: dict, path: str, **kwargs) -> dict:
    """megatron-core's ``dist_checkpointing.load``, a file that asks to run code refused in one line
    (torch's reader wraps the refusal of ``compat.safe_load`` in its own exception)."""
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(sd, path, **kwargs)
    except BaseException as exc:  # torch's CheckpointException is a BaseException
        unsafe = safe_load.find_unsafe(exc)
        if unsafe is not None:
            raise CheckpointError(str(unsafe)) from None
        raise


def check_compatible(common: dict, cfg: Config, padded_vocab: int, path: str) -> None:
    """Refuse a checkpoint of a different model shape, naming every differing field."""
    # A field added to the signature later is read from the checkpoint's stored config.
    saved = {**common.get("config", {}).get("model", {}), **common["model_signature"]}
    current = model_signature(cfg, padded_vocab)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was saved for a different model; " + "; ".join(diffs))


def saved_optimizer_format(common: dict) -> Optional[str]:
    """How a checkpoint stores its optimizer state: one of ``OPTIMIZER_FORMATS`` (distributed
    optimizer), ``PLAIN_OPTIMIZER``, or None (weights only). Checkpoints written before the format was
    recorded hold the plain optimizer's state: saves with the distributed optimizer failed then."""
    if not common.get("has_optimizer", True):
        return None
    return common.get("optimizer_format", PLAIN_OPTIMIZER)


def check_optimizer_state(common: dict, cfg: Config, ctx: ParallelContext, path: str) -> str:
    """The format of the checkpoint's optimizer state, after refusing (with what to do instead) state
    that cannot be loaded into this run's optimizer under this run's layout."""
    fmt = saved_optimizer_format(common)
    weights_only = "or load its weights only with checkpoint.load_optimizer=false (fresh Adam moments)"
    distributed = cfg.parallel.use_distributed_optimizer
    if (fmt == PLAIN_OPTIMIZER) == distributed:
        saved, other = (("the plain optimizer's", "the distributed optimizer") if distributed
                        else ("the distributed optimizer's", "the plain optimizer"))
        raise CheckpointError(
            f"{path} holds {saved} state (parallel.use_distributed_optimizer={str(not distributed).lower()}), which "
            f"{other} of this run cannot load (the two store their state differently); resume with "
            f"parallel.use_distributed_optimizer={str(not distributed).lower()}, {weights_only}")
    if fmt == "dp_reshardable":
        saved = common.get("layout") or {}
        diffs = [f"{name.upper()}={saved.get(name)} (now {now})" for name, now in
                 (("tp", ctx.tp_size), ("pp", ctx.pp_size)) if saved.get(name) != now]
        if diffs:
            raise CheckpointError(
                f"{path} holds distributed optimizer state in the dp_reshardable format, saved under "
                f"{', '.join(diffs)}: that format follows each tensor- and pipeline-parallel rank's gradient "
                f"buffer and loads under another number of data-parallel ranks only; resume with the saved TP and "
                f"PP, {weights_only}. (Checkpoints saved with checkpoint.optimizer_format=fully_reshardable load "
                "under any layout.)")
    elif fmt != PLAIN_OPTIMIZER:
        optimizer_metadata(fmt)  # refuses a format this version does not know
    return fmt


def load_checkpoint(path: str, model, optimizer, cfg: Config, ctx: ParallelContext, padded_vocab: int,
                    load_optimizer: bool, load_rng: bool, extra_sharded: Optional[dict] = None) -> dict:
    """Load into ``model`` (and ``optimizer``); returns the checkpoint's common state."""
    from megatron.core import dist_checkpointing

    path = resolve_checkpoint_dir(path)  # the caller chose it intact; the metadata and sizes again, cheaply
    common = read_common(path)
    check_compatible(common, cfg, padded_vocab, path)
    if load_optimizer and not common.get("has_optimizer", True):
        raise CheckpointError(f"{path} holds weights only (no optimizer state), so a run cannot resume from it; "
                              "start from it with checkpoint.finetune_from instead")
    saved_dtype = _saved_params_dtype(common) if load_optimizer else None
    current_dtype = _params_dtype(model)
    if saved_dtype is not None and saved_dtype != current_dtype:
        raise CheckpointError(f"{path} was saved by a {saved_dtype} run and this run is {current_dtype} "
                              "(train.precision): the optimizer state of one does not load into the other. Resume "
                              f"with train.precision={'bf16' if saved_dtype == 'bfloat16' else 'fp32'}, or load the "
                              "weights only (checkpoint.load_optimizer=false: a fresh optimizer, same step and "
                              "schedule)")
    saved_format = check_optimizer_state(common, cfg, ctx, path) if load_optimizer else None
    same_layout = common.get("layout") == _layout(ctx)
    if load_rng and not same_layout:
        logger.warning("checkpoint layout %s differs from the current %s: RNG states are not restored",
                       common.get("layout"), _layout(ctx))
        load_rng = False
    sd = build_state_dict(model, optimizer, ctx, is_loading=True, with_optimizer=load_optimizer,
                          with_rng=load_rng, extra_sharded=extra_sharded, optimizer_format=saved_format)
    _merge_in_place(sd)
    loaded = load_sharded(sd, path)
    unwrap(model).load_state_dict(loaded["model"], strict=True)
    if load_optimizer:
        # no_grad: the distributed optimizer copies fp32 main params into views of fp32 weights (leaves
        # that require grad), which autograd refuses outside no_grad.
        with torch.no_grad():
            _load_optimizer_state(optimizer, loaded["optimizer"])
        _restore_adam_steps(optimizer)
    elif optimizer is not None:
        # A mixed-precision (bf16) or distributed optimizer keeps fp32 main copies of the weights, taken
        # when it was built; its first step would write those (the initial weights) back over the ones
        # just loaded.
        optimizer.reload_model_params()
    if load_rng:
        _set_rng_state(loaded["rng_state"])
    logger.info("loaded checkpoint %s (step %d%s%s)", path, common["step"],
                ", optimizer" if load_optimizer else "", ", rng" if load_rng else "")
    common.update({k: loaded[k] for k in (extra_sharded or {})})
    return common
