"""Read megatron-apex checkpoints in one process, without building a model or a parallel layout.

Both helpers use megatron-core's dist_checkpointing directly. Its loader needs a default process
group, so :func:`ensure_process_group` starts a one-rank gloo group when none exists (a tool run
from the command line), and leaves an existing one alone (inside a training job or a test).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket

import torch
import torch.distributed as dist

APEX_STATE_KEY = "apex_state"  # megatron_apex.expansion.resume.STATE_KEY (not imported: no megatron model deps)


def ensure_process_group() -> bool:
    """Start a single-rank gloo group if none exists; returns True if this call started it."""
    if dist.is_available() and dist.is_initialized():
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return True


def checkpoint_dir(path: str) -> str:
    """A checkpoint root (with the tracker file) or an ``iter_*`` directory -> the intact ``iter_*``
    directory (every file as the save wrote it, checksums compared; a root falls back to its newest
    intact checkpoint; a damaged one is refused naming the file)."""
    from megatron_apex.training.checkpoint import resolve_checkpoint_dir

    return resolve_checkpoint_dir(path, checksums=True)


def check_output_file(path: str, flag: str) -> None:
    """Refuse an output file whose directory does not exist (before any work, not after it)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: the directory {parent} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a directory")


@contextlib.contextmanager
def atomic_output(path: str):
    """Yield a temporary path beside ``path``, renamed to ``path`` when the block succeeds and removed
    when it fails: an interrupted or failed write (disk full, file size limit) leaves the previous file,
    not a truncated one."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON into ``path``, atomically (:func:`atomic_output`)."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")


def load_common(path: str) -> dict:
    from megatron_apex.training.checkpoint import read_common

    return read_common(checkpoint_dir(path))


def load_model_tensors(path: str) -> dict:
    """Global (unsharded) model tensors of a checkpoint, by key; optimizer state is not read.

    Keys are megatron-core's sharded keys without the DDP prefix, e.g.
    ``decoder.layers.mlp.linear_fc1.weight`` with the layers stacked in dim 0 ([L, out, in]).
    """
    from megatron.core import dist_checkpointing

    from megatron_apex.training.checkpoint import load_sharded

    path = checkpoint_dir(path)
    ensure_process_group()
    meta = dist_checkpointing.load_tensors_metadata(path)
    wanted = {k: v for k, v in meta.items() if not k.startswith("optimizer") and "rng" not in k}
    loaded = load_sharded(wanted, path, validate_access_integrity=False)
    return {k.removeprefix("module."): v for k, v in loaded.items() if torch.is_tensor(v)}


def load_apex_states(path: str) -> tuple[dict, dict]:
    """(common state, {(pp, tp, dp): per-rank APEX state}) of a checkpoint saved with APEX enabled.

    The per-rank state (expansion/resume.py, ApexResume.rank_state) holds this stage's vote counts and raw sums
    ([local layers, units], identical on the TP ranks of a pipeline stage, different across DP ranks),
    and per local layer its global index and selection.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_apex.training.checkpoint import load_sharded

    path = checkpoint_dir(path)
    common = load_common(path)
    if "apex" not in common:
        raise ValueError(f"{path} was not saved by an APEX run (no 'apex' entry in its common state)")
    lay = common["layout"]
    shape = (lay["pp"], lay["tp"], lay["dp"])
    ensure_process_group()
    sd = {f"r{a}_{b}_{c}": ShardedObject(APEX_STATE_KEY, None, shape, (a, b, c), replica_id=0)
          for a in range(shape[0]) for b in range(shape[1]) for c in range(shape[2])}
    loaded = load_sharded(sd, path, validate_access_integrity=False)
    states = {}
    for key in sd:
        a, b, c = (int(x) for x in key[1:].split("_"))
        states[(a, b, c)] = loaded[key]
    return common, states


def global_votes(common: dict, states: dict) -> dict:
    """Whole-model view: {'votes': {kind: [L, n]}, 'raw': {kind: [L, n]}, 'selection': {layer: {kind: sel}}}.

    Votes are summed over data-parallel ranks (each saw different data) and taken from TP rank 0
    (every TP rank holds the same gathered counts); pipeline stages contribute their own layers.
    """
    lay = common["layout"]
    n_layers = common["config"]["model"]["num_layers"]
    out = {"votes": {}, "raw": {}, "selection": {}}
    for pp in range(lay["pp"]):
        ranks = [states[(pp, 0, dp)] for dp in range(lay["dp"])]
        indices = [layer["index"] for layer in ranks[0]["layers"]]
        for kind in ranks[0]["votes"]:
            votes = sum(r["votes"][kind].long() for r in ranks)
            raw = sum(r["raw"][kind].double() for r in ranks)
            if kind not in out["votes"]:
                out["votes"][kind] = torch.zeros(n_layers, votes.shape[1], dtype=torch.int64)
                out["raw"][kind] = torch.zeros(n_layers, votes.shape[1], dtype=torch.float64)
            out["votes"][kind][indices] = votes
            out["raw"][kind][indices] = raw
        for layer in ranks[0]["layers"]:
            out["selection"][layer["index"]] = layer["selection"]
    return out


def is_png(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 8
