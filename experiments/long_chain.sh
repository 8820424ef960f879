#!/usr/bin/env bash
# The chosen design (teacher-preserving layout, argmax head, tau ~ U[0.7, 1]) with longer stages:
# stage 1 continues a screening run for MINUTES more (targets are the teacher's own InvCDF
# samples, so --target ar-rollout *is* stage-1 self-forcing), then k=2 and k=4 by self-forcing.
# Usage: experiments/long_chain.sh MINUTES STAGE1_INIT OUT_ROOT
# e.g.   OMP_NUM_THREADS=1 taskset -c 0 experiments/long_chain.sh 20 runs/screen/tp-tau-range runs/long
set -euo pipefail
MIN=${1:?minutes per stage}; INIT=${2:?stage-1 run to continue}; OUT=${3:?output root}
TEACHER=${TEACHER:-runs/teacher-small}
DATA=${DATA:-.cache/prepared/brown-v8192-s0}
KF=${KF:-.venv/bin/kforcing}
base=(--teacher "$TEACHER" --data "$DATA" --max-k 4 --time-budget-min "$MIN"
      --block-size 64 --windows 64 --batch-size 16 --eval-every-min 3 --eval-contexts 128 --quiet
      --layout teacher-preserving --tau-min 0.7 --tau-max 1.0)
run_stage() {  # k init out [flags]
  local k=$1 init=$2 out=$3; shift 3
  if [ -f "$out/checkpoints/latest.json" ]; then resume=(--resume); else resume=(); fi
  echo "== k=$k from $init -> $out"
  "$KF" distill "${base[@]}" --k "$k" --init "$init" --out "$out" "${resume[@]}" "$@"
}
run_stage 1 "$INIT" "$OUT/k1" --target ar-rollout
run_stage 2 "$OUT/k1" "$OUT/k2"
run_stage 4 "$OUT/k2" "$OUT/k4"
for k in 1 2 4; do
  "$KF" match --student "$OUT/k$k" --data "$DATA" --windows 1024 --k "$k"
done > "$OUT/match.jsonl"
echo "== done: $OUT/match.jsonl"
