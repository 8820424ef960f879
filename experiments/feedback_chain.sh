#!/usr/bin/env bash
# The token-feedback student on the Brown teacher (issue 11), end to end, resumable:
# teacher cache -> stage k=1 (teacher-forced) -> self-forcing k=2 -> k=4 -> measurements.
# Usage: experiments/feedback_chain.sh [OUT]   (default runs/fb)
# Budgets are CPU-minutes of one thread; run it pinned, e.g.
#   OMP_NUM_THREADS=1 taskset -c 1 nohup experiments/feedback_chain.sh runs/fb > runs/fb.log 2>&1 &
set -euo pipefail
OUT=${1:-runs/fb}
TEACHER=${TEACHER:-runs/teacher-small}
DATA=${DATA:-.cache/prepared/brown-v8192-s0}
PY=${PY:-.venv/bin/python}
S1_MIN=${S1_MIN:-20}; K2_MIN=${K2_MIN:-10}; K4_MIN=${K4_MIN:-15}
EXTRA=${EXTRA:-}          # extra distill flags for every stage, e.g. "--draft-vocab 2048"
T=("$PY" -m kforcing distill --design feedback --teacher "$TEACHER" --data "$DATA"
   --threads "${THREADS:-1}")
M="$PY experiments/feedback_measure.py"
resume() { [ -f "$1/checkpoints/latest.json" ] && echo --resume || true; }

CACHE=${CACHE:-$OUT/cache}   # the teacher cache does not depend on the draft: share it
CACHE_FLAGS=(--cache "$CACHE" --cache-windows "${WINDOWS:-4096}")
"${T[@]}" --k 1 --out "$OUT/s1" "${CACHE_FLAGS[@]}" --cache-only --quiet
"${T[@]}" --k 1 --out "$OUT/s1" "${CACHE_FLAGS[@]}" --time-budget-min "$S1_MIN" --quiet $EXTRA \
  $(resume "$OUT/s1")
"${T[@]}" --k 2 --init "$OUT/s1" --out "$OUT/k2" --time-budget-min "$K2_MIN" --anchors 64 --bf16 \
  --lr 1e-3 --quiet $EXTRA $(resume "$OUT/k2")
"${T[@]}" --k 4 --init "$OUT/k2" --out "$OUT/k4" --time-budget-min "$K4_MIN" --anchors 32 --bf16 \
  --lr 1e-3 --quiet $EXTRA $(resume "$OUT/k4")
$M curves --runs "$OUT/s1" "$OUT/k2" "$OUT/k4" --out "$OUT/curves.png"
for run in s1 k2 k4; do
  $M match --student "$OUT/$run" --data "$DATA" --out "$OUT/match-$run.json" > /dev/null
done
$M quality --student "$OUT/k4" --data "$DATA" --out "$OUT/quality-k4.json" > /dev/null
$M speed --student "$OUT/k4" --ks 2 4 --out "$OUT/speed-k4.json" > /dev/null
echo "done: $OUT"
