#!/usr/bin/env bash
# A job array of independent runs, each growing and training all the stacks of its own rack: here a sweep over
# learning rates. The stacks of one left-to-right rack are sequential (each trains on the previous one's
# output), so parallelism comes from independent projects; use chain.sh for one large rack.
#
#   sbatch --array=0-3 examples/slurm/sweep-array.sh recipes/llama/small.yaml
#
#SBATCH --job-name=stackwise-sweep
#SBATCH --gres=gpu:1
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -uo pipefail
recipe=${1:?usage: sweep-array.sh RECIPE}
lrs=(3e-4 6e-4 1e-3 2e-3)
i=${SLURM_ARRAY_TASK_ID:-0}
here=$(cd "$(dirname "$0")" && pwd)
# build is idempotent: the requeued task runs the same command and continues where the preempted one stopped.
exec "$here/stage.sh" build -p "runs/sweep-lr-${lrs[$i]}" --recipe "$recipe" --set "train.lr=${lrs[$i]}"
