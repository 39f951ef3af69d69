"""Start-up under torchrun, slurm (one task per GPU) or mpirun, and the parallel context.

The launcher is recognised from its environment:

* torchrun / any launcher that exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``;
* slurm with one task per GPU (``srun`` directly): ``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID``; the master is the first host of ``SLURM_JOB_NODELIST`` (expanded with
  ``scontrol show hostnames`` when available) and ``MASTER_PORT`` (default 29500);
* mpirun (Open MPI / MPICH / Intel MPI): ranks from mpi4py; rank 0's host name and a free port
  are broadcast over MPI, so no environment needs to be prepared.

megatron-core's ``parallel_state`` is wrapped here once: the rest of the project reads ranks,
sizes and groups from :class:`ParallelContext`, never from globals.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_apex.config import Config, ConfigError

logger = logging.getLogger(__name__)


@dataclass
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # Fallback parser for "prefix[01-04,07],other" (every bracket, e.g. "rack[1-2]-n[01-04]", takes
    # its first value).
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    return re.sub(r"\[([^\]]+)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


def detect_launch_env(env: Optional[dict] = None) -> LaunchEnv:
    """Read rank/world/master from torchrun, slurm or MPI variables (single process if none)."""
    env = dict(os.environ if env is None else env)
    port = int(env.get("MASTER_PORT", 29500))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), port, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        master = env.get("MASTER_ADDR") or _first_slurm_host(nodelist)
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         master, port, "slurm")
    mpi_rank = next((env[k] for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID")
                     if k in env), None)
    if mpi_rank is not None:
        return _mpi_launch_env(env, port)
    return LaunchEnv(0, 1, 0, "127.0.0.1", _free_port() if "MASTER_PORT" not in env else port, "single")


def _mpi_launch_env(env: dict, port: int) -> LaunchEnv:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError("launched under MPI but mpi4py is not installed: pip install 'megatron_apex[mpi]'") from exc
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    master = env.get("MASTER_ADDR") or (socket.gethostname() if rank == 0 else None)
    master_port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else (_free_port() if rank == 0 else None)
    master, master_port = comm.bcast((master, master_port), root=0)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    return LaunchEnv(rank, size, local, master, master_port, "mpi")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ParallelContext:
    """Ranks, sizes and process groups of this process: the one object code asks about layout."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int
    tp_group: object
    pp_group: object
    dp_group: object      # data-parallel group (with CP folded in, as megatron-core reduces gradients)
    dp_only_group: object  # data-parallel group without CP
    cp_group: object
    mp_group: object      # model-parallel (TP x PP) group

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that prints and writes metrics: last pipeline stage, first TP/DP/CP rank."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0 and self.cp_rank == 0

    def describe(self) -> str:
        return (f"world={self.world_size} TP={self.tp_size} PP={self.pp_size} CP={self.cp_size} "
                f"DP={self.dp_size} device={self.device.type}")


def initialize_distributed(cfg: Config, launch: Optional[LaunchEnv] = None) -> ParallelContext:
    """Start torch.distributed and megatron-core's parallel state for the configured layout."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    launch = launch or detect_launch_env()
    from megatron_apex.compat.cpu import cpu_patches_needed

    cfg.validate(launch.world_size)  # layout errors before any process group starts
    cuda = torch.cuda.is_available()
    if cpu_patches_needed():
        raise RuntimeError("no CUDA here, and megatron-core assumes it: call "
                           "megatron_apex.compat.cpu.apply_cpu_patches() first (the entry points do, see docs/cpu.md)")
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("parallel.backend='nccl' needs CUDA; use 'gloo' or 'auto' on this machine")
    if cuda:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    timeout = datetime.timedelta(minutes=cfg.parallel.distributed_timeout_minutes)
    if not dist.is_initialized():
        init_method = f"tcp://{launch.master_addr}:{launch.master_port}"
        try:
            dist.init_process_group(backend=backend, init_method=init_method, rank=launch.rank,
                                    world_size=launch.world_size, timeout=timeout)
        except Exception as exc:  # rendezvous failures deserve a message a user can act on
            raise RuntimeError(
                f"rank {launch.rank}/{launch.world_size} ({launch.launcher}) could not join the rendezvous at "
                f"{init_method} within {cfg.parallel.distributed_timeout_minutes} min: {exc}. Check MASTER_ADDR/"
                "MASTER_PORT, that the first node is reachable and the port is free.") from exc
    p = cfg.parallel
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            context_parallel_size=p.context_parallel_size,
            distributed_timeout_minutes=p.distributed_timeout_minutes,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    ctx = ParallelContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=launch.local_rank, device=device,
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(), cp_size=ps.get_context_parallel_world_size(),
        tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(with_context_parallel=True),
        dp_only_group=ps.get_data_parallel_group(), cp_group=ps.get_context_parallel_group(),
        mp_group=ps.get_model_parallel_group(),
    )
    logger.info("distributed start (%s, %s): %s", launch.launcher, backend, ctx.describe())
    return ctx


def destroy_distributed() -> None:
    """Tear down megatron-core's parallel state and the process group (tests, clean exits)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
