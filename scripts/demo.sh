#!/usr/bin/env bash
# The whole clora story on the embedded toy base model, in a workspace of its own.
#   DEMO_DIR   workspace (default .clora/demo; its registry.db and outputs live there)
#   DEMO_TINY  1: the test-size world and fewer steps (a smoke run of about 3 minutes)
#   DEMO_STEPS, DEMO_MORE_STEPS  distill steps of the first collection and of the incremental run
# The full world's base and teachers are shipped with clora (clora_toy/prebuilt), so they are installed,
# not trained. A second run reuses the collections too, so it only generates and evaluates.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-.clora/demo}
mkdir -p "$DEMO_DIR"
export CLORA_REGISTRY="$DEMO_DIR/registry.db"
export CLORA_HOME=${CLORA_HOME:-$PWD/.clora/home}

if [ "${DEMO_TINY:-0}" = "1" ]; then
  SIZE="--size tiny"; FIRST="sepia invert warm cool"; MORE="posterize hue-120"; BATCH=4
  STEPS="--steps ${DEMO_STEPS:-60}"; MORE_STEPS="--steps ${DEMO_MORE_STEPS:-30}"
else
  SIZE="--size full"; FIRST="sepia invert hue-120 channel-swap warm tint-teal vignette blur"
  MORE="cool solarize"; BATCH=16
  # sized for the 15-minute story on 2 cores: short runs (`clora distill` without --steps trains 375
  # steps per effect), half the default source images per effect and general edits
  # (scripts/demo_distill.json); benchmarks/README.md has what the defaults reach
  STEPS="--steps ${DEMO_STEPS:-700} --config scripts/demo_distill.json"
  MORE_STEPS="--steps ${DEMO_MORE_STEPS:-400} --config scripts/demo_distill.json"
fi
start=$(date +%s)
step() { printf '\n\033[1m== %s\033[0m (at %d s)\n' "$*" "$(( $(date +%s) - start ))"; }

step "1. the toy base model (shipped with clora and installed into $CLORA_HOME; --force retrains it)"
# shellcheck disable=SC2086
clora toy build-base $SIZE

step "2. one teacher LoRA per effect (shipped, or trained if not), registered with a trigger word"
# shellcheck disable=SC2086
clora toy teachers $FIRST $SIZE
clora effect list

step "3. distill every effect and few-step sampling into one LoRA"
if clora collections --json | grep -q '"version"'; then
  echo "collection v1 exists in $DEMO_DIR; reusing it (delete $DEMO_DIR to start over)"
else
  # shellcheck disable=SC2086
  clora distill $STEPS --batch-size "$BATCH"
fi

step "4. edit held-out images from the one file: two effects, each alone and composed (4 steps, no CFG)"
# shellcheck disable=SC2086
clora toy sources --out "$DEMO_DIR/inputs" -n 4 $SIZE
set -- $FIRST
clora generate --effect "$1" --image "$DEMO_DIR/inputs" --out "$DEMO_DIR/out" --no-progress
clora generate --effect "$2" --image "$DEMO_DIR/inputs" --out "$DEMO_DIR/out" --no-progress
clora generate --effect "$1" --effect "$2" --image "$DEMO_DIR/inputs" --out "$DEMO_DIR/out" --grid --no-progress

step "5. evaluate: student vs teachers vs truth, bleeding, cost"
clora eval --collection 1 --n-images 8 --merge none --report "$DEMO_DIR/report-v1" --no-progress

step "6. add two effects and grow the collection incrementally"
# shellcheck disable=SC2086
clora toy teachers $MORE $SIZE
# shellcheck disable=SC2086
clora distill --incremental $MORE_STEPS --batch-size "$BATCH"   # says "nothing new" on a second run
# + the merged-LoRA baseline (the exact sum of the members' deltas; `clora eval` alone sweeps more merges)
clora eval --collection 2 --n-images 8 --merge cat --report "$DEMO_DIR/report-v2" --no-progress

step "summary: one file per collection, mean PSNR vs the true effect, bleed rate, speed-up"
clora collections

step "done in $(( $(date +%s) - start )) s"
echo "reports: $DEMO_DIR/report-v1/index.html and $DEMO_DIR/report-v2/index.html; images: $DEMO_DIR/out"
