"""The checkpoint directory: its layout, which checkpoint to resume from, and atomic writes.

Layout (compatible with Megatron-LM's)::

    <root>/latest_checkpointed_iteration.txt   written last, atomically, after every rank finished
    <root>/iter_0000100/                       torch_dist shards + common state (metadata.json last)
    <root>/saving.iter_0000200/                a save in progress (or interrupted): never read
    <root>/replaced.iter_0000100/              a checkpoint of the same step, moved aside for a new one

A save writes into ``saving.*`` and renames it into place once every rank has finished, before the
tracker moves: a crash during a save leaves the tracker and the checkpoint it names untouched, and the
next save removes the leftover. A damaged newest checkpoint (integrity.py) falls back to the newest
intact one.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Optional

from megatron_apex.compat import safe_load
from megatron_apex.config import Config

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
COMPLETE_MARKER = "metadata.json"  # megatron-core's dist_checkpointing writes it after all shards
SAVING_PREFIX = "saving."      # a save in progress (or interrupted): never read, removed by the next save
REPLACED_PREFIX = "replaced."  # an earlier save of the same step, moved aside while the new one moves in
FORMAT_VERSION = 1
EXIT_WRITE_FAILED = 74  # sysexits' EX_IOERR


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used with the current configuration (the message says why)."""


class CheckpointWriteError(CheckpointError):
    """A save could not write its files (disk full, quota, file size limit); the staging directory is gone
    and the previous checkpoint is untouched. The run exits with :data:`EXIT_WRITE_FAILED`."""


def iter_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def iter_step(name: str) -> Optional[int]:
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
    steps = [iter_step(name) for name in os.listdir(root)]
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
                if iter_step(os.path.basename(os.path.normpath(path))) is not None
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


def write_atomic(path: str, text: str) -> None:
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


def remove_leftovers(root: str) -> None:
    """Remove what interrupted saves left (never a directory the tracker can name)."""
    for name in os.listdir(root):
        if name.startswith((SAVING_PREFIX, REPLACED_PREFIX)) and os.path.isdir(os.path.join(root, name)):
            logger.warning("removing %s, left by an interrupted save", os.path.join(root, name))
            shutil.rmtree(os.path.join(root, name))


def move_into_place(staging: str, target: str) -> None:
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


def prune(root: str, keep: int, saved: int) -> None:
    """checkpoint.keep_last: keep the newest ``keep`` complete checkpoints up to ``saved`` (the step
    just saved, which the tracker names). Incomplete directories and steps newer than ``saved`` (left
    by an earlier run that went further) are neither counted nor deleted."""
    complete, newer, incomplete = [], [], []
    for name in os.listdir(root):
        step = iter_step(name)
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
