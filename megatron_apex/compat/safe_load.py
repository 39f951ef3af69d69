"""Reading a checkpoint or a dataset index cache never runs code from the file.

Three readers in torch and megatron-core unpickle what they read, so a crafted file runs its code in
every process that reads it (and can hand back the real object, so nothing looks wrong):

1. torch's ``FileSystemReader.read_metadata`` reads a checkpoint's ``.metadata`` with ``pickle.load``;
2. torch's ``DefaultLoadPlanner.load_bytes`` (megatron-core's load planner inherits it) reads the
   byte items of a ``.distcp`` (our RNG states and APEX state) with ``torch.load(weights_only=False)``;
3. megatron-core's GPTDataset and BlendedDataset read their ``.npy`` index caches with
   ``numpy.load(allow_pickle=True)``.

:func:`install` (1, 2) and :func:`install_index_cache_reader` (3) replace each with a reader that admits only what such files hold: ``.metadata``
through an unpickler that knows the checkpoint metadata classes and nothing else, byte items with
``torch.load(weights_only=True)`` (plus numpy arrays, for the numpy RNG state), caches without
pickle. Anything else raises :class:`UnsafeFileError` naming the file and what it asked for, before
any of its code runs. The common state (``common.pt``) is read by megatron-core with torch's default
``weights_only=True`` already. Installed once per process, on import, by the modules that read these
files (``training.checkpoint``, ``data.datasets``).
"""

from __future__ import annotations

import functools
import io
import pickle
import types
from typing import Optional

import numpy as np
import torch


class UnsafeFileError(RuntimeError):
    """A file asked to run code (or to build an object a checkpoint never holds) while being read."""


_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                     "torch.distributed.checkpoint.filesystem")
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}


def _metadata_class_allowed(module: str, name: str) -> bool:
    if (module, name) in _METADATA_GLOBALS:
        return True
    if module == "torch":  # dtypes (torch.float32), layouts and memory formats are plain values
        return isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
    if module in _METADATA_MODULES:
        import importlib

        obj = getattr(importlib.import_module(module), name, None)
        return isinstance(obj, type) or name == "_MEM_FORMAT_ENCODING"  # classes and that one enum
    return False


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        if not _metadata_class_allowed(module, name):
            raise UnsafeFileError(f"{self.where}: refusing to read it: it asks for {module}.{name}, which a "
                                  "checkpoint's metadata never holds (the file may try to run code)")
        return super().find_class(module, name)


def load_metadata(file, where: Optional[str] = None):
    """A torch distributed-checkpoint ``.metadata`` object, read by the restricted unpickler."""
    where = where or getattr(file, "name", ".metadata")
    try:
        return _MetadataUnpickler(file, where).load()
    except UnsafeFileError:
        raise
    except Exception as exc:  # truncated, or not a pickle at all: damage, which the caller may fall back from
        raise OSError(f"{where}: unreadable checkpoint metadata ({type(exc).__name__}: {exc})") from None


def _numpy_globals() -> list:
    reconstruct = getattr(getattr(np, "_core", np.core), "multiarray")._reconstruct
    return [reconstruct, np.ndarray, np.dtype, *{type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)}]


def load_bytes_item(data, where: str):
    """One byte item of a checkpoint (``torch.save`` output) with ``weights_only=True``: tensors,
    containers, numbers, strings and numpy arrays; anything else raises :class:`UnsafeFileError`."""
    if isinstance(data, (bytes, bytearray)):
        data = io.BytesIO(data)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(data, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeFileError(f"{where}: refusing to read it: not plain checkpoint data ({first[:200]})") from None


def _safe_load_bytes(self, read_item, value: io.BytesIO) -> None:
    """``DefaultLoadPlanner.load_bytes`` with :func:`load_bytes_item` for ``torch.load(weights_only=False)``."""
    from torch.distributed.checkpoint._traverse import set_element

    fqn = read_item.dest_index.fqn
    obj = load_bytes_item(value, f"checkpoint item {fqn!r}")
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[fqn], obj)
    else:
        self.state_dict[fqn] = obj


class _PicklelessNumpy(types.ModuleType):
    """``numpy`` as megatron-core's dataset modules see it, with ``load`` never unpickling."""

    def __init__(self):
        super().__init__("numpy")

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def load(file, *args, **kwargs):
        kwargs["allow_pickle"] = False
        try:
            return np.load(file, *args, **kwargs)
        except ValueError as exc:  # an object array: "... allow_pickle=False", or with mmap "... Python objects"
            if "allow_pickle" not in str(exc) and "Python objects" not in str(exc):
                raise
            raise UnsafeFileError(f"{file}: refusing to read this index cache: it holds pickled Python objects "
                                  "(megatron-core writes plain integer arrays); delete it and the run builds the "
                                  "indices again") from None


_PICKLE_SHIM = types.SimpleNamespace(**{name: getattr(pickle, name) for name in dir(pickle) if not name.startswith("__")})
_PICKLE_SHIM.load = load_metadata


@functools.lru_cache(maxsize=None)
def install() -> None:
    """Patch torch's two checkpoint readers (module docstring, 1 and 2); idempotent."""
    from torch.distributed.checkpoint import default_planner, filesystem

    filesystem.pickle = _PICKLE_SHIM  # read_metadata's pickle.load; its pickle.dump (saving) is unchanged
    default_planner.DefaultLoadPlanner.load_bytes = _safe_load_bytes


@functools.lru_cache(maxsize=None)
def install_index_cache_reader() -> None:
    """Patch megatron-core's dataset index cache reads (module docstring, 3); idempotent."""
    from megatron.core.datasets import blended_dataset, gpt_dataset

    shim = _PicklelessNumpy()
    gpt_dataset.numpy = shim
    blended_dataset.numpy = shim


def find_unsafe(exc: BaseException) -> Optional[UnsafeFileError]:
    """The :class:`UnsafeFileError` behind ``exc``, if any: torch's distributed checkpoint wraps the
    errors of its readers (``CheckpointException.failures``), Python chains others."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UnsafeFileError):
            return e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None
