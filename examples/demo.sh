#!/usr/bin/env bash
# The README's main job: on a CPU, build the reflect toy world (once: K dependent mod-10 steps,
# a student that already writes `wait` after some of its own wrong lines, near the edge of what
# it can do, and a teacher that always does), run plain OPD and OPD+ReNIO for the same compute,
# and compare the student before and after.
set -euo pipefail
RENIO=${RENIO:-renio}
OUT=${OUT:-runs/demo}
$RENIO toy build --world reflect
$RENIO run --config sample_configs/toy-reflect-opd.yaml run_dir="$OUT/opd" "$@"
$RENIO run --config sample_configs/toy-reflect-opd-renio.yaml run_dir="$OUT/opd-renio" "$@"
cp "$OUT/opd/eval-base/eval.json" "$OUT/before.json"
cp "$OUT/opd/eval-final.json" "$OUT/OPD.json"
cp "$OUT/opd-renio/eval-final.json" "$OUT/OPD+ReNIO.json"
echo
echo "Reflect-world test set: the student before, and after the same compute of OPD and of OPD+ReNIO"
$RENIO eval --compare "$OUT/before.json" "$OUT/OPD.json" "$OUT/OPD+ReNIO.json"
