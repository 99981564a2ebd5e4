#!/usr/bin/env bash
# One array task of array.sh: the arm at index SLURM_ARRAY_TASK_ID of the arms given, through slurm/stage.sh
# (requeued on exit 75, when a preemption signal stopped it after a checkpoint).
#   arm-task.sh SPEC OUT ARM...
set -uo pipefail
spec=${1:?usage: arm-task.sh SPEC OUT ARM...}
out=${2:?usage: arm-task.sh SPEC OUT ARM...}
shift 2
arms=("$@")
# sbatch runs a copy of this script from its spool folder: array.sh passes stage.sh's path.
stage=${STACKWISE_STAGE:-$(cd "$(dirname "$0")/../slurm" && pwd)/stage.sh}
exec "$stage" bench compare "$spec" -o "$out" --arm "${arms[${SLURM_ARRAY_TASK_ID:-0}]}"
