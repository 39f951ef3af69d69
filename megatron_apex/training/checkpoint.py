"""Saving and loading checkpoints with megatron-core dist_checkpointing (torch_dist), resharding across
layouts. The directory (layout, tracker, which checkpoint to resume, atomic renames) is
checkpoint_dir.py; integrity.py checks the files; compat/dist_checkpoint.py holds the workarounds for
megatron-core's optimizer state and writers.

The common state holds the step, consumed samples, the resolved config, the parallel layout it
was saved under, and a *model signature* (every shape-defining field, the QKV bias, RoPE theta and
scaling, the RMSNorm epsilon and the attention window). Loading compares the signature with the current model and refuses a mismatch with the
list of differing fields. Model weights (and the plain optimizer's state) are stored as global
tensors, so they load under any TP/PP layout; the distributed optimizer's state is stored in one of
two formats (``checkpoint.optimizer_format``, recorded in the common state, see
:func:`optimizer_metadata`); RNG states are per (PP, TP) rank and are restored only when the layout
is unchanged.
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
from megatron_apex.compat.dist_checkpoint import (OptimizerStateMismatch, distributed_optimizers, drop_empty_param_state,
                                                  init_distributed_optimizer_state, load_optimizer_state,
                                                  merge_in_place, restore_adam_steps, share_cpu_slices,
                                                  start_writer_results_queue)
from megatron_apex.config import Config
from megatron_apex.distributed import ParallelContext
from megatron_apex.training.checkpoint_dir import (  # noqa: F401  (the directory's names, for callers)
    COMPLETE_MARKER, EXIT_WRITE_FAILED, FORMAT_VERSION, REPLACED_PREFIX, SAVING_PREFIX, TRACKER, CheckpointError,
    CheckpointWriteError, has_checkpoint, is_complete, iter_dir, iter_step, move_into_place, prune, read_common,
    read_latest, remove_leftovers, resolve_checkpoint_dir, resume_source, write_atomic)
from megatron_apex.training.integrity import ManifestError, record_manifest

logger = logging.getLogger(__name__)
safe_load.install()  # reading a checkpoint never runs code from it

SIGNATURE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "query_groups",
                    "head_dim", "tie_embeddings", "rotary_base", "norm_epsilon",
                    "rope_scaling_factor", "add_qkv_bias", "sliding_window")
# Signature fields added later, with the value every checkpoint written before them had.
_SIGNATURE_DEFAULTS = {"rope_scaling_factor": None, "add_qkv_bias": False, "sliding_window": None}


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
            init_distributed_optimizer_state(optimizer)
        fmt = optimizer_format if distributed_optimizers(optimizer) else None
        sd["optimizer"] = optimizer.sharded_state_dict(sd["model"], is_loading=is_loading,
                                                       metadata=optimizer_metadata(fmt))
        if not is_loading and fmt == "fully_reshardable":
            drop_empty_param_state(sd["optimizer"])
    if with_rng:
        sd["rng_state"] = ShardedObject("rng_state", _rng_state(), (ctx.pp_size, ctx.tp_size),
                                        (ctx.pp_rank, ctx.tp_rank), replica_id=ctx.dp_rank * ctx.cp_size + ctx.cp_rank)
    if extra_sharded:
        sd.update(extra_sharded)
    return sd


class PendingSave:
    """An asynchronous save in flight: the files are written by a forked process while training goes
    on; :meth:`poll` (on every rank, a collective) publishes the checkpoint once every rank's writer is
    done, exactly as a blocking save would: manifest, rename into place, tracker, pruning."""

    def __init__(self, queue, target: str, staging: str, root: str, step: int):
        self.queue, self.target, self.staging, self.root, self.step = queue, target, staging, root, step
        self.published = False

    def poll(self, blocking: bool) -> bool:
        """Whether the checkpoint is published (``blocking``: wait for it). A failed write raises
        :class:`CheckpointWriteError` after removing its staging directory; the previous checkpoint stays."""
        try:
            self.queue.maybe_finalize_async_calls(blocking=blocking)
        except BaseException as exc:  # torch's CheckpointException is a BaseException
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            shutil.rmtree(self.staging, ignore_errors=True)
            latest = read_latest(self.root)
            raise CheckpointWriteError(
                f"could not write the checkpoint of step {self.step} into {self.root} (in the background): "
                f"{_write_failure(exc)}; the staging directory was removed, "
                + (f"the last checkpoint (step {latest}) is intact" if latest is not None
                   else "no earlier checkpoint exists") + f" (exit code {EXIT_WRITE_FAILED})") from None
        return self.published

    def abort(self) -> None:
        """Give the save up (the run is failing): kill the background writers, drop results they may have
        left in megatron-core's process-wide results queue (a later save would read them as its own), and
        remove the staging directory. The previous checkpoint stays the latest."""
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        for call in list(self.queue.async_calls):
            call.async_caller.close(abort=True)
        self.queue.async_calls.clear()
        results = getattr(filesystem_async, "_results_queue", None)
        while results is not None and not results.empty():
            results.get_nowait()
        shutil.rmtree(self.staging, ignore_errors=True)


def _ignoring_stop_signals(fn):
    """``fn`` for the background writer: it ignores the job's stop signals, which slurm and torchrun send
    to the whole process group; the trainer handles them and waits for the write before it stops."""
    def run(*args, **kwargs):
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        return fn(*args, **kwargs)
    return run


def save_checkpoint(root: str, step: int, model, optimizer, cfg: Config, ctx: ParallelContext,
                    padded_vocab: int, consumed_samples: int, extra_common: Optional[dict] = None,
                    extra_sharded: Optional[dict] = None, async_queue=None):
    """Save on every rank; the tracker is updated by rank 0 only after all ranks finished. Returns the
    checkpoint directory, or with ``async_queue`` (megatron-core's ``AsyncCallsQueue``) a
    :class:`PendingSave` whose files are written in the background.

    ``optimizer=None`` writes a weights-only checkpoint (e.g. an imported Hugging Face model), which
    can initialise a run through ``checkpoint.finetune_from`` but not resume one.
    """
    from megatron.core import dist_checkpointing

    target = iter_dir(root, step)
    staging = os.path.join(root, SAVING_PREFIX + os.path.basename(target))
    start_writer_results_queue()
    if ctx.rank == 0:
        os.makedirs(root, exist_ok=True)
        remove_leftovers(root)
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
    share_cpu_slices(sd)
    need = _expected_size(root, sd)
    free = shutil.disk_usage(root).free
    if ctx.rank == 0 and free < need:
        logger.warning("%s: %.2f GiB free, and a checkpoint takes about %.2f GiB: this save (step %d) will probably "
                       "fail", root, free / 2**30, need / 2**30, step)
    writers = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    level = writers.level
    writers.setLevel(logging.CRITICAL)  # a writer's failure is reported once, below, with what to do
    try:
        request = dist_checkpointing.save(sd, staging, async_sharded_save=async_queue is not None)
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
    if request is None:
        _publish(root, staging, target, step, cfg, ctx)
        return target
    pending = PendingSave(async_queue, target, staging, root, step)

    def publish():
        _publish(root, staging, target, step, cfg, ctx)
        pending.published = True

    request.finalize_fns.append(publish)  # after megatron-core's own (the writers' results, metadata.json)
    if request.async_fn is not None:
        request = request._replace(async_fn=_ignoring_stop_signals(request.async_fn))
    async_queue.schedule_async_request(request)
    return pending


def _publish(root: str, staging: str, target: str, step: int, cfg: Config, ctx: ParallelContext) -> None:
    """Every rank's files are written: record them, move the directory into place, then the tracker.

    A failure on any rank (its manifest, or rank 0's move) reaches every rank through the collectives
    that end each phase, and each raises the same :class:`CheckpointWriteError`: no rank waits for
    one that gave up."""
    dist.barrier()
    failed = _everywhere(lambda: record_manifest(staging, ctx.rank, ctx.world_size), ctx, every_rank=True)
    if failed is None:
        def move():
            move_into_place(staging, target)
            write_atomic(os.path.join(root, TRACKER), f"{step}\n")
            if cfg.checkpoint.keep_last:
                prune(root, cfg.checkpoint.keep_last, step)

        failed = _everywhere(move, ctx, every_rank=False)
    if failed is not None:
        if ctx.rank == 0 and not os.path.isdir(target):  # not moved into place: an unpublished staging directory
            shutil.rmtree(staging, ignore_errors=True)
        if ctx.world_size > 1:
            dist.barrier()  # every rank got here (the failure was gathered): none leaves before the clean-up
        latest = read_latest(root)
        raise CheckpointWriteError(f"could not publish the checkpoint of step {step} in {root}: {failed}; "
                                   + (f"the tracker names step {latest}, intact" if latest is not None
                                      else "no earlier checkpoint exists") + f" (exit code {EXIT_WRITE_FAILED})")
    logger.info("saved checkpoint %s", target)


def _everywhere(fn, ctx: ParallelContext, every_rank: bool) -> Optional[str]:
    """Run ``fn`` on every rank (``every_rank``) or on rank 0 alone, then tell every rank the first
    failure, as "rank R: what" (None when all succeeded). A collective: replaces a barrier."""
    error = None
    if every_rank or ctx.rank == 0:
        try:
            fn()
        except ManifestError as exc:  # names the rank whose files could not be read
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 -- reported on every rank below
            error = f"rank {ctx.rank}: {type(exc).__name__}: {exc}"
    if ctx.world_size == 1 or not dist.is_initialized():
        return error
    errors = [None] * ctx.world_size
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


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
    saved = {**_SIGNATURE_DEFAULTS, **common.get("config", {}).get("model", {}), **common["model_signature"]}
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
    merge_in_place(sd)
    loaded = load_sharded(sd, path)
    unwrap(model).load_state_dict(loaded["model"], strict=True)
    if load_optimizer:
        # no_grad: the distributed optimizer copies fp32 main params into views of fp32 weights (leaves
        # that require grad), which autograd refuses outside no_grad.
        with torch.no_grad():
            try:
                load_optimizer_state(optimizer, loaded["optimizer"])
            except OptimizerStateMismatch as exc:
                raise CheckpointError(f"{path}: {exc}") from None
        restore_adam_steps(optimizer)
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
