"""Peak tensor memory per phase of a training step, on a GPU and on the CPU.

On a GPU the caching allocator counts every tensor (``torch.cuda.max_memory_allocated``); the phases
read and reset its peak counter when they change. The CPU allocator keeps no such count, so on the
CPU :class:`LiveBytes` keeps one: a ``TorchDispatchMode`` that sees every operator's outputs, adds
the size of each new storage when it appears and subtracts it when the storage is freed. Both give
the bytes of tensors alive, without the allocator's caching or the process's libraries (which
``ru_maxrss`` includes), so their ratios compare the model state and the step's temporaries only.

Phases nest (the chain rule runs inside megatron-core's forward-backward function); a peak counts for
the innermost phase running when it was reached.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Bytes of the CPU storages created by operators while active and not yet freed, and their peak.

    An output sharing its storage with an input (in-place operators, ``out=``, views) adds nothing.
    Storages created before the mode was entered are not counted: enter it before the model is
    built to count everything. Not counted either: memory allocated without an operator (a library's
    own buffers, e.g. gloo's), and a storage's later in-place resize (it keeps the size it was created
    with). Every operator goes through Python here, so steps run slower.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0  # since the last reset_peak()
        self._seen = set()

    def reset_peak(self) -> None:
        self.peak = self.live

    def _free(self, key) -> None:
        self._seen.discard(key)
        self.live -= key[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if not key[1] or key[0] in inputs or key in self._seen:
                continue
            self._seen.add(key)
            self.live += key[1]
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)  # the storage's Python object lives as long as it does
        return out


class PhasePeaks:
    """Peak tensor memory per named phase: ``wrap`` methods as phases, ``start`` before building the model.

    ``peaks[phase]`` is the largest number of bytes alive while that phase (innermost) ran;
    ``take()`` returns the peak since its last call (every phase included), for per-step figures.
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.stack = ["setup"]
        self.peaks: dict = {}
        self._since_take = 0
        self.reserved = 0  # GPU: peak of max_memory_reserved (the counters are reset at every switch)
        self.mode: Optional[LiveBytes] = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.mode = LiveBytes()
            self.mode.__enter__()

    def stop(self) -> None:
        self._switch()
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None

    @property
    def peak(self) -> int:
        """The largest peak of any phase so far (the whole run's, after ``stop``)."""
        return max(self.peaks.values(), default=0)

    def _switch(self) -> None:
        """Credit the peak since the last switch to the running phase, and restart the count."""
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
            self.reserved = max(self.reserved, torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()
        else:
            peak = self.mode.peak
            self.mode.reset_peak()
        phase = self.stack[-1]
        self.peaks[phase] = max(self.peaks.get(phase, 0), peak)
        self._since_take = max(self._since_take, peak)

    def enter(self, phase: str) -> None:
        self._switch()
        self.stack.append(phase)

    def exit(self) -> None:
        self._switch()
        self.stack.pop()

    def take(self) -> int:
        self._switch()
        peak, self._since_take = self._since_take, 0
        return peak

    def wrap(self, obj, name: str, phase: str) -> None:
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            self.enter(phase)
            try:
                return fn(*a, **k)
            finally:
                self.exit()

        setattr(obj, name, wrapper)
