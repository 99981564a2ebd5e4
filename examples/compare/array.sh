#!/usr/bin/env bash
# The arms of a comparison as a Slurm job array, one arm per task, then one job that writes the table and plot.
#
#   bash examples/compare/array.sh examples/compare/small.yaml runs/compare-small l2r e2e peer e2e-2-blocks
#
# Each task prepares the shared data project if it is not there yet (the others wait on its lock), runs its arm in
# OUT/arms/NAME and writes OUT/arms/NAME/result.json. A preempted task is requeued (stage.sh, exit 75) and resumes
# its arm; a task whose arm already finished does nothing. The last job gathers the finished arms (--report).
set -euo pipefail
spec=${1:?usage: array.sh SPEC OUT ARM...}
out=${2:?usage: array.sh SPEC OUT ARM...}
shift 2
arms=("$@")
here=$(cd "$(dirname "$0")" && pwd)
n=$((${#arms[@]} - 1))
job=$(sbatch --parsable --array=0-"$n" --requeue --signal=B:USR1@120 --gres=gpu:1 --time=24:00:00 \
  --job-name=compare --export=ALL,STACKWISE_STAGE="$(cd "$here/../slurm" && pwd)/stage.sh" "$here/arm-task.sh" "$spec" "$out" "${arms[@]}")
sbatch --parsable --dependency=afterok:"$job" --job-name=compare-report --time=1:00:00 \
  --wrap "stackwise bench compare $spec -o $out --report"
