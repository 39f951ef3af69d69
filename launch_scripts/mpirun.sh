#!/usr/bin/env bash
# megatron-apex under mpirun (Open MPI, MPICH/Hydra, Intel MPI): one rank per GPU. The engine takes
# its rank from mpi4py and broadcasts rank 0's host and a free port, so nothing else needs to be set
# (pip install 'megatron_apex[mpi]' for mpi4py).
#
#   NP=16 HOSTFILE=hosts.txt bash launch_scripts/mpirun.sh CONFIG [section.key=value ...]
#
# Run it from any directory: CONFIG, and relative paths in the config or the overrides (checkpoint.save,
# data.data_path, ...), are relative to the directory you run it from, as with `megatron-apex train`;
# the workers import this checkout's megatron_apex (see launch_scripts/common.sh).
# Run it again with the same arguments to resume from the latest checkpoint in checkpoint.save.
# Exit codes: 0 finished, 75 stopped cleanly after saving, 2 config error, 1 error (mpirun reports
# the first non-zero exit code of its ranks).
#
# Environment knobs (besides those in launch_scripts/common.sh: PYTHON, DIST_TIMEOUT_MINUTES,
# EXIT_AFTER_MINUTES):
#   NP          number of ranks (default: the number of visible GPUs, or 1)
#   HOSTFILE    hosts to run on (default: this machine only); its lines are "host slots=8" (Open MPI)
#               or "host:8" (MPICH/Hydra)
#   MPIRUN      the launcher (default: mpirun)
#   MPIRUN_ARGS extra launcher flags as one string, e.g. "--bind-to none --map-by ppr:8:node"
#
# Signals: Open MPI's mpirun forwards SIGUSR1/SIGUSR2 to the ranks (SIGTERM makes it kill the job
# after a short delay), Hydra forwards SIGTERM/SIGINT/SIGUSR1. Send SIGUSR1 to mpirun for a
# save-and-stop; the trainer treats SIGUSR1 like SIGTERM.
#
# Environment: the variables exported by apex_setup_env reach remote ranks only if the launcher
# exports them; Open MPI needs them named (-x, done below), Hydra exports the whole environment.
# Remote ranks start in the same directory as mpirun (Open MPI and Hydra both default to it): the
# launch directory, and the checkout (APEX_DIR), must exist at the same paths on every host.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG [section.key=value ...]" >&2
  exit 2
fi
APEX_DIR="${APEX_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=launch_scripts/common.sh
source "$APEX_DIR/launch_scripts/common.sh"
apex_setup_env
apex_default_overrides

NP="${NP:-$(apex_local_gpus)}"
MPIRUN="${MPIRUN:-mpirun}"
mpi_args=(-np "$NP")
if [[ -n "${HOSTFILE:-}" ]]; then
  mpi_args+=(-hostfile "$HOSTFILE")
fi
if "$MPIRUN" --version 2>&1 | grep -qi "open mpi"; then
  for var in CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING OMP_NUM_THREADS PYTHONUNBUFFERED \
             PATH LD_LIBRARY_PATH PYTHONPATH; do
    mpi_args+=(-x "$var")
  done
  mpi_args+=(--bind-to none)
fi
if [[ -n "${MPIRUN_ARGS:-}" ]]; then
  read -r -a extra <<<"$MPIRUN_ARGS"
  mpi_args+=("${extra[@]}")
fi

apex_log_run_info "$APEX_DIR" "$@"
echo "mpirun: $NP rank(s)${HOSTFILE:+ on the hosts of $HOSTFILE}"

rc=0
"$MPIRUN" "${mpi_args[@]}" "${PYTHON:-python}" -m megatron_apex.train "$1" "${APEX_DEFAULT_OVERRIDES[@]}" \
  "${@:2}" || rc=$?
echo "training exited with code $rc"
apex_maybe_requeue "$rc"
exit "$rc"
