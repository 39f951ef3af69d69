"""Workarounds for megatron-core's dist_checkpointing and distributed optimizer, as this project uses them
(torch's Adam without Transformer Engine or NVIDIA apex, CPU tensors, jobs stopped by signals). Each
says what it works around; training/checkpoint.py calls them.
"""

from __future__ import annotations

import os
import signal

import torch


class OptimizerStateMismatch(ValueError):
    """A checkpoint's optimizer state does not fit this run's optimizers."""


def distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]


def _torch_adam_optimizers(optimizer) -> list:
    """The distributed optimizers whose inner optimizer is torch's Adam (no Transformer Engine or NVIDIA
    apex): those whose checkpoint loads need the workarounds here."""
    adams = (torch.optim.Adam, torch.optim.AdamW)
    return [o for o in distributed_optimizers(optimizer) if isinstance(o.optimizer, adams)]


def init_distributed_optimizer_state(optimizer) -> None:
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


def load_optimizer_state(optimizer, state) -> None:
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
        raise OptimizerStateMismatch(f"the checkpoint holds the state of {len(states)} optimizers, this run "
                                     f"has {len(chained)}")
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


def restore_adam_steps(optimizer) -> None:
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


def drop_empty_param_state(state) -> None:
    """fully_reshardable saves gather the parameter state on DP rank 0; the other DP ranks' state dicts
    hold ``param_state=None``, which is not saved (it would only make the common state differ from
    rank 0's, a warning at every save)."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

    if isinstance(state, dict):
        if "param_state_sharding_type" in state and state.get("param_state") is None:
            state["param_state"] = LocalNonpersistentObject(None)
        for value in state.values():
            drop_empty_param_state(value)


def start_writer_results_queue() -> None:
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
    # The manager never acts on the stop signals: the trainer does (they reach the whole process group), and
    # the manager dies with it; its initializer ignores them. SIGINT is blocked here while it starts, so that
    # a Ctrl-C cannot cut the handshake (the trainer takes it once the manager is up).
    stop_signals = frozenset({signal.SIGTERM, signal.SIGUSR1, signal.SIGINT})
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        manager.start(helper_init, (os.getpid(), stop_signals))
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


def share_cpu_slices(sd: dict) -> None:
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


def merge_in_place(sd: dict) -> None:
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
