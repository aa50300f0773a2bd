#!/bin/bash
# Tokenize SlimPajama-627B on 16 CPU nodes as a Slurm job array: one array task per node.
# Each task takes every 16th input file (round-robin over the sorted part list) from
# SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT; the last task to finish merges.
# Re-submitting the same array after a failure or preemption redoes only incomplete parts.
#SBATCH --job-name=slimpack-tokenize
#SBATCH --array=0-15
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=64
#SBATCH --mem=128G
#SBATCH --time=12:00:00
#SBATCH --output=logs/tokenize-%A_%a.out
set -euo pipefail

INPUT=${INPUT:-/data/SlimPajama-627B}
OUT=${OUT:-/shards/slimpajama}   # or s3://bucket/prefix

slimpack tokenize "$INPUT" --out "$OUT" \
    --config configs/tokenize/slimpajama.toml \
    --workers "${SLURM_CPUS_PER_TASK}" --no-progress \
    --json "logs/tokenize-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}.json"
