#!/usr/bin/env bash
# Submit one OPD iteration as a chain of Slurm jobs and print their ids:
#   rollout array (SHARDS tasks) -> score array (afterok) -> weight (afterok) -> train
#   (afterok, torchrun on TRAIN_GPUS) -> eval (afterok).
# Usage: examples/slurm/submit.sh [IT_DIR [ADAPTER [AFTER_JOB]]]
#   IT_DIR     where this iteration writes (default $WORK/iter-00000)
#   ADAPTER    the checkpoint to continue from (default: none, the base student)
#   AFTER_JOB  a job id the rollouts must wait for (used by iterate.sh)
# Settings live in config.sh: edit it first (models, paths, SHARDS, partition/GPU flags).
# Re-running after a failure resubmits everything; complete outputs are skipped.
set -euo pipefail
export RENIO_SLURM_DIR="${RENIO_SLURM_DIR:-$(cd "$(dirname "$0")" && pwd)}"
source "$RENIO_SLURM_DIR/config.sh"
export IT_DIR="${1:-$WORK/iter-00000}" ADAPTER="${2:-}"
after="${3:-}"
mkdir -p "$IT_DIR/logs"
sb() { sbatch --parsable --export=ALL --chdir="$IT_DIR/logs" $SBATCH_ARGS "$@"; }
last=$((SHARDS - 1))
rollout=$(sb ${after:+--dependency=afterok:$after} --array=0-$last $GPU_ARGS "$RENIO_SLURM_DIR/rollout.sbatch")
score=$(sb --dependency=afterok:$rollout --array=0-$last $GPU_ARGS "$RENIO_SLURM_DIR/score.sbatch")
weight=$(sb --dependency=afterok:$score "$RENIO_SLURM_DIR/weight.sbatch")
train_gpus=""
[ -n "$GPU_ARGS" ] && train_gpus="${GPU_ARGS%:*}:$TRAIN_GPUS"
train=$(sb --dependency=afterok:$weight $train_gpus --cpus-per-task="${TRAIN_CPUS:-1}" "$RENIO_SLURM_DIR/train.sbatch")
eval_job=$(sb --dependency=afterok:$train $GPU_ARGS "$RENIO_SLURM_DIR/eval.sbatch")
echo "rollout=$rollout score=$score weight=$weight train=$train eval=$eval_job"
