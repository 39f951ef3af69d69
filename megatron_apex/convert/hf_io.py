"""Reading and writing Hugging Face model directories, one tensor at a time.

:class:`HFTensorSource` opens ``model.safetensors``, a sharded set with
``model.safetensors.index.json``, or ``pytorch_model.bin`` (memory-mapped), and hands out tensors
by name without loading the rest, or reads one straight into a destination tensor (a model's
parameter), with no copy in between. :class:`SafetensorsShardWriter` writes sharded safetensors
files whose headers are planned up front from the tensor shapes, so each tensor is written as
soon as it is produced and then freed: peak memory is one tensor, not one shard. The file layout
(u64 header length, JSON header, raw little-endian bytes) is the safetensors format; only the
``safetensors`` package's reader is needed to read it back, and no ``transformers``.
:func:`staged_output` gives both directions a directory that appears at ``--output`` only once
the conversion is complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import struct

import torch

from megatron_apex.convert.mapping import ConversionError

logger = logging.getLogger(__name__)

SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX = ("model.safetensors", "model.safetensors.index.json",
                                                  "pytorch_model.bin", "pytorch_model.bin.index.json")
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def read_json(path: str) -> dict:
    """A JSON object from ``path``; malformed JSON, or JSON that is not an object, is refused naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def read_hf_config(hf_dir: str) -> dict:
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir}: no such directory (expected a Hugging Face model directory)")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: missing; a Hugging Face model directory needs config.json")
    return read_json(path)


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                 "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsFile:
    """Read single tensors of a safetensors file with plain reads (no memory map).

    ``safetensors.safe_open`` memory-maps the file, and the touched pages stay resident in the
    process (and count in its RSS) until the map is closed, so streaming a whole model through it
    costs a second model's worth of memory. Reading each tensor's byte range into its own buffer
    keeps peak memory at one tensor."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            except (struct.error, ValueError) as exc:
                raise ConversionError(f"{path}: not a safetensors file ({exc})") from None
        header.pop("__metadata__", None)
        self.header, self.data_start = header, 8 + n

    def keys(self) -> list:
        return list(self.header)

    def __contains__(self, name: str) -> bool:
        return name in self.header

    def _info(self, name: str) -> dict:
        if name not in self.header:
            raise ConversionError(f"{self.path}: holds no tensor {name!r}")
        return self.header[name]

    def get_slice(self, name: str):
        return _Shape(self._info(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._info(name)["dtype"]
        if code not in _TORCH_DTYPES:
            raise ConversionError(f"{self.path}: tensor {name} has unsupported dtype {code}")
        return _TORCH_DTYPES[code]

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.read_into(name, torch.empty(self._info(name)["shape"], dtype=self.dtype(name)))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor ``name`` straight into ``out`` (contiguous, of the stored shape and dtype)."""
        info = self._info(name)
        if tuple(out.shape) != tuple(info["shape"]) or out.dtype != self.dtype(name) or not out.is_contiguous():
            raise ConversionError(f"{self.path}: tensor {name} is {info['dtype']} {info['shape']}, cannot be read "
                                  f"into a {'' if out.is_contiguous() else 'non-contiguous '}{out.dtype} "
                                  f"{list(out.shape)} tensor")
        begin, end = info["data_offsets"]
        buf = out.detach().view(torch.uint8).reshape(-1).numpy() if out.numel() else None
        if buf is not None and buf.nbytes != end - begin:
            raise ConversionError(f"{self.path}: tensor {name}: {end - begin} bytes for shape {info['shape']}")
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if buf is not None and f.readinto(memoryview(buf)) != buf.nbytes:
                raise ConversionError(f"{self.path}: truncated at tensor {name}")
        return out


class _Shape:
    def __init__(self, shape):
        self._shape = shape

    def get_shape(self):
        return list(self._shape)


class HFTensorSource:
    """Lazy name -> tensor access over a HF checkpoint's weight files.

    The weight files are looked up in the order transformers' ``from_pretrained`` uses, so both read
    the same weights from a directory that holds more than one set: ``model.safetensors``, then
    ``model.safetensors.index.json``, ``pytorch_model.bin``, ``pytorch_model.bin.index.json``."""

    ORDER = (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX)

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._files = {}  # file name -> SafetensorsFile or state dict (torch.load with mmap)
        self.index = None  # the index file the weight map comes from (sharded checkpoints)
        self.weight_map = self._discover()

    def _discover(self) -> dict:
        d = self.hf_dir
        present = [name for name in self.ORDER if os.path.isfile(os.path.join(d, name))]
        if not present:
            raise ConversionError(f"{d}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} "
                                  f"or {BIN_INDEX})")
        chosen = present[0]
        if len(present) > 1:
            logger.info("%s holds %s: reading %s, as transformers does", d, " and ".join(present), chosen)
        if chosen in (SAFE_SINGLE, BIN_SINGLE):
            return {name: chosen for name in self._open(chosen).keys()}
        self.index = os.path.join(d, chosen)
        weight_map = read_json(self.index).get("weight_map")
        if not weight_map or not isinstance(weight_map, dict):
            raise ConversionError(f"{self.index}: no weight_map")
        for fname in sorted(set(weight_map.values())):
            if not isinstance(fname, str) or not os.path.isfile(os.path.join(d, fname)):
                raise ConversionError(f"{self.index} names {fname!r}, which is missing from {d}")
        return dict(weight_map)

    def _open(self, fname: str):
        if fname not in self._files:
            path = os.path.join(self.hf_dir, fname)
            if fname.endswith(".safetensors"):
                self._files[fname] = SafetensorsFile(path)
            else:
                try:
                    self._files[fname] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                except Exception as exc:  # truncated, not a zip/pickle, or unsafe to load
                    raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
        return self._files[fname]

    def _handle(self, name: str):
        """The open file that holds tensor ``name`` (as the weight map says, and checked)."""
        if name not in self.weight_map:
            raise ConversionError(f"tensor {name!r} is missing from {self.hf_dir}")
        fname = self.weight_map[name]
        handle = self._open(fname)
        if name not in handle:
            raise ConversionError(f"{self.index} maps tensor {name!r} to {fname}, which does not hold it")
        return handle

    def names(self) -> list:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        handle = self._handle(name)
        return handle.get_tensor(name) if isinstance(handle, SafetensorsFile) else handle[name]

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill ``out`` (of the tensor's shape) with tensor ``name``, cast to ``out``'s dtype. A safetensors
        tensor of ``out``'s dtype is read straight into a contiguous ``out``, with no temporary copy."""
        if tuple(out.shape) != self.shape(name):
            raise ConversionError(f"tensor {name!r}: shape {self.shape(name)} does not fit the destination "
                                  f"{tuple(out.shape)}")
        handle = self._handle(name)
        if isinstance(handle, SafetensorsFile) and out.is_contiguous() and handle.dtype(name) == out.dtype:
            handle.read_into(name, out)
        else:
            out.copy_(self.get(name))

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's dtype in the files, without reading its data."""
        handle = self._handle(name)
        return handle.dtype(name) if isinstance(handle, SafetensorsFile) else handle[name].dtype

    def shape(self, name: str) -> tuple:
        """A tensor's shape without reading its data (safetensors) or with a memory map (.bin)."""
        handle = self._handle(name)
        if isinstance(handle, SafetensorsFile):
            return tuple(handle.get_slice(name).get_shape())
        return tuple(handle[name].shape)

    def close(self) -> None:
        self._files.clear()


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (decimal units as Hugging Face uses them)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ConversionError(f"shard size {text!r}: expected e.g. 5GB, 500MB or a number of bytes")
    unit = m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base ** power)


def plan_shards(specs: list, max_shard_bytes: int) -> list:
    """Split ``[(name, shape, dtype)]`` (in write order) into shards of at most ``max_shard_bytes``
    (a single tensor larger than the limit gets a shard of its own)."""
    shards, current, size = [], [], 0
    for name, shape, dtype in specs:
        nbytes = _numel(shape) * _itemsize(dtype)
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, tuple(shape), dtype))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SafetensorsShardWriter:
    """Write tensors, in the planned order, into ``model-0000k-of-0000n.safetensors`` files (or one
    ``model.safetensors``), plus the index. Each file's header is written when the file is opened,
    from the planned shapes; :meth:`add` then appends one tensor's bytes."""

    def __init__(self, out_dir: str, specs: list, max_shard_bytes: int):
        self.out_dir = out_dir
        self.shards = plan_shards(specs, max_shard_bytes)
        n = len(self.shards)
        self.file_names = ([SAFE_SINGLE] if n == 1 else
                           [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
        self._order = [entry for shard in self.shards for entry in shard]
        self._pos = 0
        self._shard = -1
        self._file = None
        self._weight_map = {}
        self._total = 0

    def _open_next(self) -> None:
        self._close_file()
        self._shard += 1
        header, offset = {}, 0
        for name, shape, dtype in self.shards[self._shard]:
            nbytes = _numel(shape) * _itemsize(dtype)
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the reference writer aligns the data to 8 bytes
        path = os.path.join(self.out_dir, self.file_names[self._shard])
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._total += offset

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._order):
            raise ConversionError(f"tensor {name!r} was not planned (all {len(self._order)} are written)")
        want_name, shape, dtype = self._order[self._pos]
        if name != want_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ConversionError(f"writer expected {want_name} {shape} {dtype}, got {name} "
                                  f"{tuple(tensor.shape)} {tensor.dtype}")
        if self._file is None or self._pos == sum(len(s) for s in self.shards[:self._shard + 1]):
            self._open_next()
        data = tensor.detach().contiguous().view(torch.uint8).reshape(-1).numpy()  # little-endian bytes
        self._file.write(memoryview(data))
        self._weight_map[name] = self.file_names[self._shard]
        self._pos += 1

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Finish the last file and write the index (sharded only); checks every tensor was written."""
        self._close_file()
        if self._pos != len(self._order):
            missing = [n for n, _, _ in self._order[self._pos:]]
            raise ConversionError(f"{len(missing)} planned tensors were never written, e.g. {missing[:3]}")
        if len(self.file_names) > 1:
            index = {"metadata": {"total_size": self._total}, "weight_map": self._weight_map}
            with open(os.path.join(self.out_dir, SAFE_INDEX), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)


def tokenizer_files(tokenizer: str) -> list:
    """[(source path, name in the exported directory)] of the tokenizer files to copy next to the weights.

    A sentencepiece ``.model`` becomes ``tokenizer.model``; a ``tokenizer.json`` is copied with the
    ``tokenizer_config.json`` / ``special_tokens_map.json`` found beside it; a directory contributes
    every known tokenizer file it holds. Checked before the export writes anything."""
    known = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
    if os.path.isdir(tokenizer):
        sources = [os.path.join(tokenizer, n) for n in known if os.path.isfile(os.path.join(tokenizer, n))]
        if not sources:
            raise ConversionError(f"--tokenizer {tokenizer}: the directory holds none of {', '.join(known)}")
        return [(s, os.path.basename(s)) for s in sources]
    if not os.path.isfile(tokenizer):
        raise ConversionError(f"--tokenizer {tokenizer}: no such file")
    if tokenizer.endswith(".json"):
        beside = os.path.dirname(os.path.abspath(tokenizer))
        return [(tokenizer, "tokenizer.json")] + [
            (os.path.join(beside, n), n) for n in ("tokenizer_config.json", "special_tokens_map.json")
            if os.path.isfile(os.path.join(beside, n))]
    return [(tokenizer, "tokenizer.model")]  # sentencepiece model (any name)


def copy_tokenizer(files: list, out_dir: str) -> list:
    """Copy :func:`tokenizer_files` into ``out_dir``; returns the names written."""
    for src, name in files:
        shutil.copyfile(src, os.path.join(out_dir, name))
    return [name for _, name in files]


# ---------------------------------------------------------------------- output directories
def check_output_dir(output: str, force: bool = False, source: str = "") -> None:
    """Refuse an ``output`` that is a file, that holds the ``source`` being converted, or that is a
    non-empty directory unless ``force`` (which replaces it)."""
    if os.path.lexists(output) and not os.path.isdir(output):
        raise ConversionError(f"--output {output}: exists and is not a directory")
    out, src = os.path.realpath(output), os.path.realpath(source) if source else None
    if src and (src == out or src.startswith(out + os.sep)):
        raise ConversionError(f"--output {output} holds the input {source}; write the conversion elsewhere")
    if force or not os.path.isdir(output) or not os.listdir(output):
        return
    from megatron_apex.training.checkpoint import TRACKER

    entries = sorted(os.listdir(output))
    steps = [e for e in entries if e.startswith("iter_")]
    if TRACKER in entries or steps:
        what = f"a checkpoint ({', '.join(([TRACKER] if TRACKER in entries else []) + steps[-3:])})"
    else:
        what = f"{len(entries)} entries ({', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''})"
    raise ConversionError(f"--output {output} already holds {what}; choose another --output, or pass --force "
                          "to replace the directory and everything in it")


@contextlib.contextmanager
def staged_output(output: str, force: bool = False, source: str = ""):
    """Yield a new directory beside ``output`` to write into; it becomes ``output`` only once complete.

    An error or an interrupt removes it and leaves ``output`` as it was, so a directory at ``output``
    is always a finished conversion. With ``force`` an existing ``output`` is replaced: it is moved
    aside, the new directory renamed into its place, and only then deleted."""
    check_output_dir(output, force, source)
    output = os.path.abspath(output)
    parent, name = os.path.split(output)
    os.makedirs(parent, exist_ok=True)
    stage = os.path.join(parent, f".{name}.partial-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)  # left by a killed run of the same process id
    os.mkdir(stage)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if os.path.isdir(output) and os.listdir(output):
        old = os.path.join(parent, f".{name}.replaced-{os.getpid()}")
        os.rename(output, old)
        try:
            os.rename(stage, output)
        except BaseException:
            os.rename(old, output)
            raise
        shutil.rmtree(old)
    else:
        os.replace(stage, output)  # no output yet, or an empty directory


def write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")

