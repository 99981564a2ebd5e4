#!/usr/bin/env bash
# One stack trained on every GPU of one node: srun starts torchrun once, torchrun starts one rank per GPU, and FSDP2
# shards the stack's blocks over them (docs/distributed.md). Rank 0 alone takes the job lock and writes the
# manifest, the checkpoints, the logs and the stack file.
#
#   sbatch examples/slurm/train-stack-fsdp.sh runs/llama-70b 3            # stack 3
#   sbatch examples/slurm/train-stack-fsdp.sh runs/baseline all           # end to end (curriculum: end-to-end)
#
# Preemption: Slurm sends SIGUSR1 to this shell five minutes before the end (--signal=B:USR1@300); it is passed to
# srun, srun passes it to torchrun, and torchrun (told to by --signals-to-handle) to every rank. The ranks
# stop at the same step (the stop flag is all-reduced each step), rank 0 checkpoints, and the job is requeued; the
# requeued job runs the same command, which resumes from that checkpoint on however many GPUs it gets. torchrun
# kills ranks that are still running --shutdown-timeout seconds after it passed the signal on: keep that above the
# time one step and one checkpoint take.
#
# Not run on a GPU cluster here: the same code path was tested with 2 CPU processes (gloo), tests/test_distributed.py.
#
#SBATCH --job-name=stackwise-fsdp
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -uo pipefail
project=${1:?usage: train-stack-fsdp.sh PROJECT ID|all [train-stack options]}
id=${2:?usage: train-stack-fsdp.sh PROJECT ID|all [train-stack options]}
shift 2
gpus=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-$gpus} / gpus > 0 ? ${SLURM_CPUS_PER_TASK:-$gpus} / gpus : 1 ))

# In the background, so this shell can pass Slurm's signal on (bash defers traps while a foreground child runs).
srun --ntasks=1 torchrun --standalone --nproc-per-node "$gpus" --shutdown-timeout 240 \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 -m stackwise_cli train-stack "$id" -p "$project" --resume auto "$@" &
child=$!
signalled=0
trap 'signalled=1; kill -USR1 "$child" 2>/dev/null' USR1 TERM
wait "$child"
rc=$?
if [ "$rc" -gt 128 ]; then wait "$child"; rc=$?; fi  # wait returned because of the trap: wait for the exit

# torchrun's exit status is 1 when the ranks stopped on the signal (their own is 75), so ask the manifest.
trained=$(stackwise status -p "$project" --json | python3 -c '
import json, sys
rack, want = json.load(sys.stdin)["rack"], sys.argv[1]
print(int(all(s["state"] == "trained" for s in rack if want == "all" or str(s["id"]) == want)))' "$id")
if [ "$signalled" = 1 ] && [ "$trained" = 0 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "stackwise stopped to be resumed: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 75
fi
exit "$rc"
