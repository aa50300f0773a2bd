#!/bin/bash
# Multi-node training under Slurm: srun starts one trainer process per GPU, 8 per node.
#   sbatch configs/train/slurm_multinode.sh configs/train/paper-2k.toml --set data.path=/shards/slimpajama
# Hybrid sharding (parameters sharded within a node, replicated across nodes) is switched on below
# with parallel.dp_replicate = number of nodes.
#
# Time limit: 300 s before it Slurm sends SIGTERM to every rank (--signal); the ranks finish the
# step, save a checkpoint and exit 75 (resumable), and this script requeues the job, which resumes
# from the newest checkpoint that verifies (--resume auto). --requeue alone never requeues a job that
# hits its time limit; it lets `scontrol requeue` do so (and Slurm requeue after a node failure).
# Raise 300 if a step plus a save takes longer (the 1.3B model's ~18 GB checkpoint: well under it).
#
# No torchrun: it reports any non-zero rank status as its own failure (status 1), which would hide
# the 75. srun gives each rank what torch.distributed reads (RANK, LOCAL_RANK, WORLD_SIZE,
# MASTER_ADDR, MASTER_PORT).
#SBATCH --job-name=slimpack-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch slurm_multinode.sh CONFIG.toml [--set key=value ...]}
shift
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500} OMP_NUM_THREADS=8
# Rank 0 leaves this file when it exited 75. A rank's 75 must not reach srun as a failure: with
# --kill-on-bad-exit (which stops the other ranks promptly when one crashes) srun would kill the
# ranks still closing down, and report their kill instead.
RESUMABLE="${SLURM_SUBMIT_DIR:-.}/.slimpack-$SLURM_JOB_ID.resumable"
rm -f "$RESUMABLE"

status=0
srun --kill-on-bad-exit=1 bash -c '
  trap "" TERM  # Slurm signals every process of the step; the trainer handles it, this shell outlives it
  RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS python -m slimpack.train "$@" && exit 0
  rc=$?
  if [ "$rc" -ne 75 ]; then exit "$rc"; fi
  if [ "$SLURM_PROCID" -eq 0 ]; then touch "$0"; fi
  exit 0
' "$RESUMABLE" --config "$CONFIG" --resume auto --set parallel.dp_replicate="$SLURM_JOB_NUM_NODES" "$@" \
  || status=$?

if [ "$status" -eq 0 ] && [ -e "$RESUMABLE" ]; then
  rm -f "$RESUMABLE"
  echo "slimpack: checkpoint saved before the time limit (exit 75); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 75
fi
exit "$status"
