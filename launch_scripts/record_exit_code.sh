#!/usr/bin/env bash
# Run one torchrun worker and write its exit code to DIR/$LOCAL_RANK (see apex_torchrun in common.sh).
# Usage (as torchrun's entry point, with --no-python): record_exit_code.sh DIR COMMAND [ARGS...]
#
# SIGTERM/SIGUSR1 are passed on to the command (torchrun signals this script's process group,
# slurm may signal every process of the step: the trainer handles repeats) and the script keeps
# waiting until the command has saved its checkpoint and exited. SIGINT (Ctrl-C, which torchrun
# forwards as SIGINT) is passed on as SIGTERM, the trainer's stop request: a command started in the
# background by a non-interactive shell, as here, ignores SIGINT itself.
set -uo pipefail
dir="$1"
shift
child=""
trap 'kill -s TERM "$child" 2>/dev/null' TERM INT
trap 'kill -s USR1 "$child" 2>/dev/null' USR1
"$@" &
child=$!
# `wait` returns early when a trapped signal arrives; wait again until the command is gone.
while kill -0 "$child" 2>/dev/null; do
  wait "$child"
done
wait "$child"
rc=$?
echo "$rc" >"$dir/${LOCAL_RANK:-0}"
exit "$rc"
