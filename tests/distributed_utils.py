"""Run a function on N local CPU processes with gloo (one thread each), collecting return values."""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, queue):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    import torch

    from megatron_apex.compat.cpu import apply_cpu_patches

    torch.set_num_threads(1)
    apply_cpu_patches()  # as the entry points do (a no-op with CUDA)
    try:
        queue.put((rank, "ok", fn(*args)))
    except BaseException:  # report any failure to the parent, with the traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        from megatron_apex.distributed import destroy_distributed

        destroy_distributed()


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    """fn(*args) on ranks 0..world_size-1; returns the per-rank results (raises on any failure)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    import queue as queue_mod
    import time

    results, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size and not errors:
            try:
                rank, status, value = queue.get(timeout=2.0)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:  # died without reporting (killed, segfault): do not wait for the timeout
                    errors.append(f"rank(s) {dead} exited with code(s) {[procs[r].exitcode for r in dead]}")
                elif time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout:.0f}s")
                continue
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
