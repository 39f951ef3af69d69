#!/usr/bin/env bash
# Run one torchrun worker and write its exit code to DIR/$LOCAL_RANK (see apex_torchrun in common.sh).
# Usage (as torchrun's entry point, with --no-python): record_exit_code.sh DIR COMMAND [ARGS...]
#
# SIGTERM/SIGUSR1 are passed on to the command (torchrun signals this script's process group,
# slurm may signal every process of the step: the trainer handles repeats) and the script keeps
# waiting until the command has saved its checkpoint and exited. SIGINT (Ctrl-C, which torchrun
# forwards as SIGINT) is passed on as SIGTERM, the trainer's stop request: a command started in the
# background by a non-interactive shell, as here, ignores SIGINT itself.
#
# A command killed by the signal passed on to it did not choose its exit code (torchrun stops the
# other workers that way when one fails, e.g. with a configuration error): none is written for it.
set -uo pipefail
dir="$1"
shift
child=""
signalled=""
trap 'signalled=1; kill -s TERM "$child" 2>/dev/null' TERM INT
trap 'signalled=1; kill -s USR1 "$child" 2>/dev/null' USR1
"$@" &
child=$!
# `wait` returns early (128 + the signal) when a trapped signal arrives; wait again until the command
# is gone, and keep the status of that last wait: a `wait` after the command was collected may not
# return its status any more.
while :; do
  wait "$child"
  rc=$?
  kill -0 "$child" 2>/dev/null || break
done
if [[ -z "$signalled" || "$rc" -le 128 ]]; then
  echo "$rc" >"$dir/${LOCAL_RANK:-0}"
fi
exit "$rc"
