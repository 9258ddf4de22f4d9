#!/usr/bin/env bash
# The README's main job: on a CPU, build the chain toy world (once: K dependent mod-10 steps,
# a teacher that checks its lines and recovers after a wrong one), run plain OPD and
# OPD+ReNIO for the same compute, and compare the student before and after.
set -euo pipefail
RENIO=${RENIO:-renio}
OUT=${OUT:-runs/demo}
$RENIO toy build --world chain
$RENIO run --config sample_configs/toy-chain-opd.yaml run_dir="$OUT/opd" "$@"
$RENIO run --config sample_configs/toy-chain-opd-renio.yaml run_dir="$OUT/opd-renio" "$@"
cp "$OUT/opd/eval-base/eval.json" "$OUT/before.json"
cp "$OUT/opd/eval-final.json" "$OUT/OPD.json"
cp "$OUT/opd-renio/eval-final.json" "$OUT/OPD+ReNIO.json"
echo
echo "Chain-world test set: the student before, and after the same compute of OPD and of OPD+ReNIO"
$RENIO eval --compare "$OUT/before.json" "$OUT/OPD.json" "$OUT/OPD+ReNIO.json"
