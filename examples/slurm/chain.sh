#!/usr/bin/env bash
# Left-to-right growth as a Slurm dependency chain: train 0 -> (cache 1 -> train 1) -> (cache 2 -> train 2) ...
# Each stage is its own job; a stage starts only when the one before it succeeded (afterok).
#
#   bash examples/slurm/chain.sh runs/llama-small recipes/llama/small.yaml
#
# Every job is requeued when it is preempted: Slurm sends SIGUSR1 two minutes before the end
# (--signal=B:USR1@120), stackwise checkpoints and exits 75, and stage.sh requeues the job; the requeued job
# runs the same command, which resumes from the checkpoint (--resume auto).
set -euo pipefail
project=${1:?usage: chain.sh PROJECT RECIPE}
recipe=${2:?usage: chain.sh PROJECT RECIPE}
here=$(cd "$(dirname "$0")" && pwd)
sbatch_common=(--parsable --requeue --signal=B:USR1@120 --gres=gpu:1 --time=24:00:00)

stackwise prepare -p "$project" --recipe "$recipe" 2>/dev/null || stackwise status -p "$project" >/dev/null
stacks=$(python3 -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['recipe']['rack']['stacks'])" "$project/stackwise.yaml")

# Grow the whole planned rack up front: growing only writes initial weights, and fixes each stack's id.
have=$(stackwise status -p "$project" --json | python3 -c "import json,sys; print(len(json.load(sys.stdin)['rack']))")
for _ in $(seq "$have" $((stacks - 1))); do stackwise grow -p "$project" --side right --json; done
ids=$(stackwise status -p "$project" --json | python3 -c "import json,sys; print(' '.join(str(s['id']) for s in json.load(sys.stdin)['rack']))")

dep=()
first=1
for id in $ids; do
  if [ "$first" = 0 ]; then
    job=$(sbatch "${sbatch_common[@]}" "${dep[@]}" --job-name="cache-$id" "$here/stage.sh" cache "$id" -p "$project")
    dep=(--dependency=afterok:"$job")
  fi
  job=$(sbatch "${sbatch_common[@]}" "${dep[@]}" --job-name="train-$id" "$here/stage.sh" train-stack "$id" -p "$project" --resume auto)
  dep=(--dependency=afterok:"$job")
  first=0
done
sbatch "${sbatch_common[@]}" "${dep[@]}" --job-name=fuse-eval --wrap "stackwise fuse -p '$project' && stackwise eval -p '$project' --json"
