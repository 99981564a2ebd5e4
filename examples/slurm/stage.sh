#!/usr/bin/env bash
# One stackwise stage as a Slurm batch step, requeued when it stopped early to be resumed.
#   sbatch --requeue --signal=B:USR1@120 stage.sh train-stack 3 -p runs/x --resume auto
# Exit codes (docs/operations.md): 0 done, 1 an error to fix by hand, 75 stopped on a signal after a
# checkpoint: requeue, and the same command resumes.
set -uo pipefail
# Run stackwise in the background so this shell can forward Slurm's signal to it (bash defers traps while a
# foreground child runs).
stackwise "$@" &
child=$!
trap 'kill -USR1 "$child" 2>/dev/null' USR1 TERM
wait "$child"
rc=$?
if [ "$rc" -gt 128 ]; then wait "$child"; rc=$?; fi  # wait returned because of the trap: wait for the exit
if [ "$rc" -eq 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "stackwise stopped to be resumed: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
