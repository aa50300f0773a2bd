#!/bin/bash
# Multi-node training with torchrun's c10d rendezvous under Slurm: one torchrun per node, 8 GPUs each.
#   sbatch configs/train/slurm_multinode.sh configs/train/paper-2k.toml --set data.path=/shards/slimpajama
# Hybrid sharding (parameters sharded within a node, replicated across nodes) is switched on below
# with parallel.dp_replicate = number of nodes. Slurm sends SIGTERM before the time limit
# (--signal); the trainer saves a checkpoint and exits 0, and a requeued job resumes (--resume auto).
#SBATCH --job-name=slimpack-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch slurm_multinode.sh CONFIG.toml [--set key=value ...]}
shift
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=8

# srun forwards SIGTERM to torchrun, which forwards it to every rank, then SIGKILLs them after
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 by default: too short to finish a step and write the
# 1.3B model's ~18 GB checkpoint). Allow most of the 300 s that --signal gives before the time limit.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=240
srun --kill-on-bad-exit=1 torchrun \
  --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node 8 \
  --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:29500" --rdzv-id "$SLURM_JOB_ID" \
  -m slimpack.train --config "$CONFIG" --resume auto \
  --set parallel.dp_replicate="$SLURM_JOB_NUM_NODES" "$@"
