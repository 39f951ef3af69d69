"""One run at a time per checkpoint directory.

Two jobs writing into the same ``checkpoint.save`` delete each other's staging directories and name
each other's weights as their own. So a run holds ``<checkpoint.save>/run.lock`` from its start to its
end (global rank 0 takes it for the whole job). The file is created with ``O_CREAT | O_EXCL``, atomic
on local and network file systems (NFS v3 and later, Lustre, GPFS), and says who holds it: host, pid,
process start time, job id. Its holder touches it every :data:`HEARTBEAT_S` seconds.

A second run is refused with one line naming the holder. A lock whose holder is gone is taken over
with a warning: on the same host, when no process with that pid and start time is alive (or it is this
very process: an earlier run in it that ended with an exception); on another host, when the file has not
been touched for :data:`STALE_S` seconds (its heartbeat stopped).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class LockHeldError(RuntimeError):
    """Another live run holds the checkpoint directory (the message names it)."""


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (clock ticks since boot, /proc), None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_alive(holder: dict, path: str) -> bool:
    if holder.get("host") == socket.gethostname():
        if int(holder.get("pid", -1)) == os.getpid():
            return False  # an earlier run of this very process that ended without releasing (an exception)
        return _process_start(int(holder.get("pid", -1))) == holder.get("process_start")
    try:
        return time.time() - os.path.getmtime(path) < STALE_S
    except OSError:
        return False


def describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    job = f", slurm job {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, started {started}"


class RunLock:
    """``<directory>/run.lock`` for the life of this process's run (module docstring)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                "started": time.time(), "job": os.environ.get("SLURM_JOB_ID"), "token": self.token}

    def _read(self) -> Optional[dict]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or damaged: treated as a holder of unknown liveness (by its age)

    def acquire(self) -> "RunLock":
        os.makedirs(self.directory, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # released meanwhile
                if _holder_alive(holder, self.path):
                    raise LockHeldError(f"{self.directory} is in use by another run ({describe(holder)}): two runs "
                                        "writing one checkpoint.save overwrite each other's checkpoints; give this "
                                        f"run its own checkpoint.save, or stop the other (if it is gone, delete "
                                        f"{self.path})")
                logger.warning("%s: taking over the lock of a run that is gone (%s)", self.path, describe(holder))
                stale = f"{self.path}.stale.{self.token}"
                try:
                    os.rename(self.path, stale)  # one of several takers wins; the others see the new lock
                    os.remove(stale)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._record(), f)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._heartbeat, name="checkpoint-lock", daemon=True)
            self._thread.start()
            return self
        raise LockHeldError(f"{self.path}: could not take the lock (other runs are taking it at the same time)")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock if it is still this run's (idempotent)."""
        self._stop.set()
        holder = self._read()
        if holder and holder.get("token") == self.token:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
