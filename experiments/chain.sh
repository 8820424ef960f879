#!/usr/bin/env bash
# Progressive self-forcing distillation k=1 -> 2 -> 4 for the chosen design, MINUTES per stage.
# Usage: experiments/chain.sh MINUTES INIT_K1_RUN OUT_ROOT [extra distill flags...]
# e.g.   experiments/chain.sh 10 runs/screen/tau-range runs/chain --tau-min 0.7 --tau-max 1.0
set -euo pipefail
MIN=${1:?minutes per stage}; K1=${2:?stage-1 run}; OUT=${3:?output root}; shift 3
TEACHER=${TEACHER:-runs/teacher-small}
DATA=${DATA:-.cache/prepared/brown-v8192-s0}
KF=${KF:-.venv/bin/kforcing}
base=(--teacher "$TEACHER" --data "$DATA" --max-k 4 --time-budget-min "$MIN"
      --block-size 64 --windows 64 --batch-size 16 --eval-every-min 2 --eval-contexts 64 --quiet)
prev=$K1
for k in 2 4; do
  out=$OUT/k$k
  if [ -f "$out/checkpoints/latest.json" ]; then resume=(--resume); else resume=(); fi
  echo "== k=$k from $prev"
  "$KF" distill "${base[@]}" --k $k --init "$prev" --out "$out" "${resume[@]}" "$@"
  prev=$out
done
