# shellcheck shell=bash
# Shared set-up of the launch scripts; sourced, never run. Everything here is plain environment
# and bookkeeping: the scripts only build a command line for `python -m megatron_apex.train`.
#
# Relative paths (the config file, checkpoint.save/load, data paths, logging.tensorboard_dir) are
# relative to the directory the job is launched (or submitted) from: the scripts do not change
# directory. They put the checkout they belong to (APEX_DIR) first on PYTHONPATH, so the workers import
# its megatron_apex from any directory, installed or not.
#
# Knobs (environment variables, all optional):
#   PYTHON               interpreter with megatron_apex's dependencies (default: python)
#   DIST_TIMEOUT_MINUTES parallel.distributed_timeout_minutes (unset: the config file's value, 30 minutes
#                        if it has none). It bounds the rendezvous and every collective, including the
#                        barrier at which ranks wait while rank 0 builds the GPTDataset index caches of a
#                        large corpus on first use.
#   EXIT_AFTER_MINUTES   train.exit_after_minutes: save and stop (exit code 75) after this much wall
#                        time, e.g. a few minutes before the job's time limit (needs checkpoint.save).
#   REQUEUE=1            slurm only: on exit code 75, `scontrol requeue $SLURM_JOB_ID`; the requeued
#                        job runs the same command and resumes from the latest checkpoint.
#
# Dataset index caches: megatron-core's BlendedMegatronDatasetBuilder builds the document/sample/
# shuffle indices on global rank 0 while all other ranks wait at a barrier, then the others load
# them. Point data.data_cache_path at storage every node can read (e.g. a Lustre/NFS directory
# beside the data) so the indices are built once per dataset and reused by every later job.

# Exit code of a clean early stop after a checkpoint (megatron_apex.training.trainer.EXIT_INCOMPLETE).
APEX_EXIT_INCOMPLETE=75

# Environment for megatron-core on GPU clusters. Values already set by the user win.
apex_setup_env() {
  # The checkout's package, whatever the working directory (which stays the user's: see above).
  export PYTHONPATH="${APEX_DIR}${PYTHONPATH:+:${PYTHONPATH}}"
  # One CUDA work queue per device: megatron-core's tensor-parallel communication overlap and
  # sequence parallelism rely on kernels being issued in program order.
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
  # Turn a hung or failed NCCL collective into an exception (and a dead job) instead of a hang.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  # One CPU thread per rank for the CPU-side parts (data loading, gloo); raise it for CPU runs.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  # Log lines reach the job's output file as they are written.
  export PYTHONUNBUFFERED=1
  # NCCL on InfiniBand / RoCE clusters (set what your site documents; NCCL's defaults are usually
  # right on DGX-like nodes):
  #   export NCCL_IB_HCA=mlx5            # which HCAs to use (prefix match), e.g. "mlx5_0,mlx5_1"
  #   export NCCL_IB_GID_INDEX=3         # RoCE v2
  #   export NCCL_IB_TIMEOUT=22          # InfiniBand retry timeout (4.096 us * 2^22 ~ 17 s)
  #   export NCCL_SOCKET_IFNAME=ib0      # interface of the bootstrap/socket traffic (not lo, not docker0)
  #   export NCCL_NET_GDR_LEVEL=PHB      # GPUDirect RDMA distance
  #   export NCCL_DEBUG=INFO             # once, to see the chosen transports; WARN otherwise
  # gloo (CPU runs, or torch.distributed's own bootstrap) picks its interface separately:
  #   export GLOO_SOCKET_IFNAME=ib0
}

# The first host of a slurm node list: the node that hosts the rendezvous. (Not `| head -n1`: with
# `set -o pipefail`, scontrol dies of SIGPIPE once head has closed the pipe on a long node list.)
apex_first_host() {
  local hosts
  hosts="$(scontrol show hostnames "$1")"
  echo "${hosts%%$'\n'*}"
}

# The knobs above as `key=value` words in the global array APEX_DEFAULT_OVERRIDES, placed before the
# command line's own overrides (the last value of a key wins). Only knobs that are set: an override
# would also beat the config file's value of its key.
apex_default_overrides() {
  APEX_DEFAULT_OVERRIDES=()
  if [[ -n "${DIST_TIMEOUT_MINUTES:-}" ]]; then
    APEX_DEFAULT_OVERRIDES+=("parallel.distributed_timeout_minutes=${DIST_TIMEOUT_MINUTES}")
  fi
  if [[ -n "${EXIT_AFTER_MINUTES:-}" ]]; then
    APEX_DEFAULT_OVERRIDES+=("train.exit_after_minutes=${EXIT_AFTER_MINUTES}")
  fi
}

# What ran, for the log: host, git revision, package versions and GPUs.
apex_log_run_info() {
  local repo="$1"
  shift
  echo "=== megatron-apex launch: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  echo "command: $*"
  if command -v git >/dev/null 2>&1 && git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    local dirty=""
    git -C "$repo" diff --quiet HEAD -- 2>/dev/null || dirty=" (uncommitted changes)"
    echo "git revision: $(git -C "$repo" rev-parse HEAD)${dirty}"
  else
    echo "git revision: unknown (not a git checkout)"
  fi
  # Versions from the installed metadata: importing torch and megatron.core here would cost seconds.
  "${PYTHON:-python}" - <<'EOF' || echo "versions: unknown (python failed)"
import platform
from importlib.metadata import PackageNotFoundError, version

def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"

print(f"versions: python {platform.python_version()}, torch {v('torch')}, megatron-core {v('megatron-core')}, "
      f"megatron_apex {v('megatron_apex')}, transformer-engine {v('transformer_engine')}")
EOF
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi || echo "nvidia-smi failed"
  else
    echo "nvidia-smi: not found (no NVIDIA driver on $(hostname))"
  fi
  echo "==="
}

# REQUEUE=1 and a clean early stop: put the job back in the queue (same command, same save dir:
# the next start resumes from the latest checkpoint).
apex_maybe_requeue() {
  local rc="$1"
  if [[ "$rc" -eq "$APEX_EXIT_INCOMPLETE" && "${REQUEUE:-0}" == "1" && -n "${SLURM_JOB_ID:-}" ]]; then
    echo "training stopped cleanly with a checkpoint (exit $rc): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  elif [[ "$rc" -eq "$APEX_EXIT_INCOMPLETE" ]]; then
    echo "training stopped cleanly with a checkpoint (exit $rc): resubmit the same command to resume"
  fi
}

# torchrun on this node: `apex_torchrun TORCHRUN_ARGS... -- CONFIG [OVERRIDES...]`.
#
# torchrun treats any non-zero worker exit as a failure and exits 1, so the workers run through
# record_exit_code.sh, which writes the exit code of each one that exited by itself (not of one
# torchrun killed because another failed); when all the recorded codes are the same (75: stopped
# cleanly after saving, 2: configuration error), this node reports that code.
# On SIGTERM/SIGINT torchrun forwards the signal to its workers' process groups (record_exit_code.sh
# turns SIGINT into the trainer's SIGTERM) and waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default
# here 600, torchrun's own default is 30) before SIGKILL, so a large checkpoint can finish writing.
apex_torchrun() {
  local -a launcher=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do
    launcher+=("$1")
    shift
  done
  shift  # the "--"
  local codes rc=0
  codes="$(mktemp -d "${TMPDIR:-/tmp}/megatron-apex-exit.XXXXXX")"
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"
  "${PYTHON:-python}" -m torch.distributed.run "${launcher[@]}" --no-python \
    bash "$APEX_DIR/launch_scripts/record_exit_code.sh" "$codes" \
    "${PYTHON:-python}" -m megatron_apex.train "$@" || rc=$?
  local f code shared=""
  for f in "$codes"/*; do
    [[ -e "$f" ]] || continue
    code="$(cat "$f")"
    if [[ -z "$shared" ]]; then
      shared="$code"
    elif [[ "$code" != "$shared" ]]; then
      shared="differ"
    fi
  done
  rm -rf "$codes"
  # torchrun's 1 stands for whatever the workers said; pass on a code all the recorded ones share.
  if [[ "$rc" -ne 0 && "$shared" =~ ^[1-9][0-9]*$ ]]; then
    rc=$shared
  fi
  return "$rc"
}

# Number of GPUs visible on this node (1 when there are none, e.g. a CPU test run).
apex_local_gpus() {
  local n
  n="$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)"
  if [[ "$n" -gt 0 ]]; then echo "$n"; else echo 1; fi
}
