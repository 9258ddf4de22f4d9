#!/usr/bin/env bash
# The on-policy loop of `renio run`, driven from the shell: ITERATIONS chains of submit.sh,
# each iteration's rollouts sampled from the previous iteration's checkpoint and waiting for
# its train job. Everything is submitted at once; Slurm runs it in order.
# Usage: examples/slurm/iterate.sh   (settings in config.sh, including ITERATIONS)
# Iteration i writes $WORK/iter-0000i/ (rollouts/, scores/, weights.parquet, ckpt/, eval.json),
# the same layout as `renio run`. Each iteration uses new prompts only if PROMPTS changes per
# iteration; to cycle through one big file, split it beforehand (PROMPTS_PATTERN below).
set -euo pipefail
export RENIO_SLURM_DIR="${RENIO_SLURM_DIR:-$(cd "$(dirname "$0")" && pwd)}"
source "$RENIO_SLURM_DIR/config.sh"
adapter="" after=""
for ((i = 0; i < ITERATIONS; i++)); do
  it_dir=$(printf '%s/iter-%05d' "$WORK" "$i")
  # PROMPTS_PATTERN, e.g. "prompts-%05d.jsonl", picks one prompt file per iteration.
  [ -n "${PROMPTS_PATTERN:-}" ] && PROMPTS=$(printf "$PROMPTS_PATTERN" "$i")
  ids=$(PROMPTS="$PROMPTS" SEED="$i" "$RENIO_SLURM_DIR/submit.sh" "$it_dir" "$adapter" "$after")
  echo "iter $i: $ids"
  after=$(sed -E 's/.*train=([0-9]+).*/\1/' <<<"$ids")
  adapter="$it_dir/ckpt"
done
