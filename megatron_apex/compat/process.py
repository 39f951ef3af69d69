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


def helper_init(parent_pid: int, ignored: frozenset = frozenset()) -> None:
    """Initializer of a helper process (e.g. a ``multiprocessing`` manager): ignore the ``ignored``
    signals, which the parent handles for the whole process group, and die with the parent, so that
    neither a stop signal nor the parent's death (SIGKILL, OOM) leaves the helper behind. Ignored, not
    blocked: a signal mask is per thread, and threads the helper started before this ran (its bootstrap
    imports the job's main module, and torch starts threads) would still take a SIGTERM and die of it;
    a disposition holds for the whole process."""
    for sig in ignored:
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent_pid)


_FORK_HOOK = []


def _libc_prctl():
    """libc's ``prctl``, or None where there is none (not Linux, no libc found)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def forked_children_die_with_parent() -> None:
    """Every process this one forks from now on (checkpoint writers, DataLoader workers) asks Linux to
    kill it when this process dies: a trainer killed with SIGKILL (the OOM killer, ``kill -9``) while
    megatron-core's forked checkpoint writers wait on it must not leave them behind, orphaned, holding
    their memory (checkpoint writers and DataLoader workers are forked by the main thread). Idempotent.

    libc is looked up here, once: the child, right after fork (in a process with threads), only makes
    the one system call (``ctypes.util.find_library`` runs a subprocess and must not run there)."""
    if _FORK_HOOK:
        return
    prctl = _libc_prctl()
    if prctl is None:
        return
    import threading

    parent = []

    def before() -> None:
        parent[:] = [os.getpid(), threading.current_thread() is threading.main_thread()]

    def after_in_child() -> None:
        # Linux sends the signal when the *thread* that forked exits: only a fork from the main thread,
        # which lives as long as the process, may ask for it (a multiprocessing.Pool's handler thread
        # forks replacement workers, and its exit must not kill them while they hold the pool's locks).
        if not parent[1]:
            return
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent[0]:  # the parent died before the request took effect
            os._exit(1)

    os.register_at_fork(before=before, after_in_child=after_in_child)
    _FORK_HOOK.append(True)
