"""Helper processes that must not outlive the process that started them.

Kept free of heavy imports: a ``spawn`` child imports this module to run :func:`helper_init`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> bool:
    """Ask Linux to SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``), and exit
    at once if the parent is already gone. Returns False where that is not available (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)
    return True


def helper_init(parent_pid: int, blocked: frozenset = frozenset()) -> None:
    """Initializer of a helper process (e.g. a ``multiprocessing`` manager): block ``blocked`` signals,
    which the parent handles for the whole process group, and die with the parent, so that neither a
    stop signal nor the parent's death (SIGKILL, OOM) leaves the helper behind."""
    if blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, set(blocked))
    die_with_parent(parent_pid)


_FORK_HOOK = []


def forked_children_die_with_parent() -> None:
    """Every process this one forks from now on (checkpoint writers, DataLoader workers) asks Linux to
    kill it when this process dies: a trainer killed with SIGKILL (the OOM killer, ``kill -9``) while
    megatron-core's forked checkpoint writers wait on it must not leave them behind, orphaned, holding
    their memory. Idempotent."""
    if _FORK_HOOK:
        return
    parent = []

    def before() -> None:
        parent[:] = [os.getpid()]

    def after_in_child() -> None:
        die_with_parent(parent[0])

    os.register_at_fork(before=before, after_in_child=after_in_child)
    _FORK_HOOK.append(True)
