#!/usr/bin/env bash
# megatron-apex on one machine with torchrun (a workstation, a cloud VM, or an interactive
# allocation): one worker per GPU.
#
#   GPUS_PER_NODE=8 bash launch_scripts/torchrun_single_node.sh CONFIG [section.key=value ...]
#
# Run it from any directory: CONFIG, and relative paths in the config or the overrides (checkpoint.save,
# data.data_path, ...), are relative to the directory you run it from, as with `megatron-apex train`;
# the workers import this checkout's megatron_apex (see launch_scripts/common.sh).
# Run it again with the same arguments to resume from the latest checkpoint in checkpoint.save.
# Ctrl-C, or SIGTERM to the script's process group (`kill -TERM -- -PGID`, as terminals, slurm and
# job schedulers signal): torchrun forwards the signal, the workers save a checkpoint and the script
# exits with 75. (A SIGTERM to the script's own PID alone does not reach torchrun: signal the group.)
# Exit codes: 0 finished, 75 stopped cleanly after saving, 2 config error, 1 error.
#
# Environment knobs (besides those in launch_scripts/common.sh: PYTHON, DIST_TIMEOUT_MINUTES,
# EXIT_AFTER_MINUTES):
#   GPUS_PER_NODE  workers (default: the number of visible GPUs, or 1 without any)
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

GPUS_PER_NODE="${GPUS_PER_NODE:-$(apex_local_gpus)}"

apex_log_run_info "$APEX_DIR" "$@"
echo "single node: $GPUS_PER_NODE worker(s)"

rc=0
# The stop signals reach torchrun and the workers with this shell (one process group); the shell
# itself waits for them to save and exit, and reports their code, instead of dying of the signal.
trap ':' TERM INT
# --standalone: a private rendezvous on a free local port, nothing to configure.
apex_torchrun --standalone --nnodes=1 --nproc_per_node="$GPUS_PER_NODE" --max_restarts=0 \
  -- "$1" "${APEX_DEFAULT_OVERRIDES[@]}" "${@:2}" || rc=$?
echo "training exited with code $rc"
apex_maybe_requeue "$rc"
exit "$rc"
