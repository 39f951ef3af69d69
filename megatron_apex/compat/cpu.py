"""Run megatron-core on machines without CUDA (the test suite, CI, laptops).

megatron-core 0.16.1 assumes CUDA in a handful of ways (measured, see docs/cpu.md):

1. ``torch.cuda.current_device()`` used as a device for new tensors;
2. ``torch.cuda.synchronize()`` in p2p communication and checkpoint writers;
3. the model-parallel RNG tracker reads and writes CUDA generator state;
4. literal ``device="cuda"`` in tensor factories (schedules, optimizer scales, clip_grads);
5. type-name checks such as ``param.type() == 'torch.cuda.FloatTensor'``.

On a machine without CUDA every one of these raises, so redirecting them to the CPU cannot
change any behaviour that works. :func:`apply_cpu_patches` does exactly that, once, and only
when ``torch.cuda.is_available()`` is False. It is the single place in the project that knows
about these internals; the CPU test suite exercises every engine feature that relies on it,
so a megatron-core upgrade that breaks a patch fails loudly.

The entry points apply it, visibly (``run.run_training``, ``convert.runtime.single_process``, the
benchmarks); ``distributed.initialize_distributed`` refuses to start on a CPU machine without it.
Scope: (4) is confined to megatron-core's modules (their module-level ``torch`` is a proxy). The
others are process-wide, as torch allows no narrower scope for them: tensor methods (``.cuda``,
``.type``) belong to the class, and megatron-core reaches ``torch.cuda`` and its RNG functions from
modules it imports lazily, after any per-module redirection could run.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
import types

import torch

logger = logging.getLogger(__name__)

_APPLIED = False
# megatron-core modules whose tensor factories ask for CUDA on the paths this project uses; they are
# imported before patching so that their module-level ``torch`` can be redirected.
_MCORE_MODULES = (
    "megatron.core.utils", "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication", "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler", "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer", "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads", "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings", "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.cross_entropy", "megatron.core.transformer.module",
    "megatron.core.models.gpt.gpt_model", "megatron.core.dist_checkpointing.strategies.filesystem_async",
)
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "zeros_like",
              "ones_like", "empty_like", "full_like")


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, int):
        return True  # an integer device index means a CUDA ordinal in megatron-core
    return isinstance(device, str) and device.startswith("cuda")


def _redirect_device(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)  # pinned (page-locked) host memory needs a CUDA device
        return fn(*args, **kwargs)

    return wrapper


class _CpuFactoryTorch(types.ModuleType):
    """``torch`` as seen by megatron-core modules: factories asked for CUDA build on the CPU.

    Installed as the module-level name ``torch`` of megatron-core modules only, so no other library
    in the process (transformers, say) sees a changed ``torch.zeros``.
    """

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _redirect_device(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_PROXY = None


def _redirect_mcore_factories() -> None:
    global _PROXY
    _PROXY = _PROXY or _CpuFactoryTorch()
    for name in _MCORE_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = _PROXY


class CpuRNGStatesTracker:
    """Drop-in for megatron-core's CudaRNGStatesTracker that keeps CPU generator states.

    Same contract: named states seeded with :meth:`add`, and :meth:`fork` runs a block with
    the named state swapped into the default generator, saving the advanced state back.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def cpu_patches_needed() -> bool:
    """Whether this process needs :func:`apply_cpu_patches` and has not applied it."""
    return not torch.cuda.is_available() and not _APPLIED


def apply_cpu_patches() -> bool:
    """Patch megatron-core's CUDA assumptions when CUDA is absent. Returns True if applied.

    Idempotent; a no-op on machines with CUDA.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    # (4): factories asked for device="cuda" (or a CUDA ordinal) build on the CPU instead, in
    # megatron-core's modules only (re-run on every call: modules imported since are covered too).
    _redirect_mcore_factories()
    if _APPLIED:
        return True

    # (1) and (2): a CPU "current device"; synchronisation is a no-op on the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self

    # (5): type-name checks: report CPU tensors under their CUDA type names, as megatron-core's
    # optimizer and grad-clipping code compare against those literally.
    orig_type = torch.Tensor.type

    def _type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = orig_type(self)
            if self.device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
                return "torch.cuda." + name[len("torch."):]
            return name
        return orig_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = _type

    # (3): CPU RNG tracker in place of the CUDA one.
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mcore_random._CUDA_RNG_STATE_TRACKER = None
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    _APPLIED = True
    logger.info("CUDA not available: megatron-core CPU compatibility patches applied")
    return True
