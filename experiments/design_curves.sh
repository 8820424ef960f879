#!/usr/bin/env bash
# Issue 11, "measure side by side": learning curves of the two parallel K-Forcing designs on the
# Brown teacher, at the CPU-minutes the token-feedback chain (experiments/feedback_chain.sh) had,
# then one figure of all three designs (docs/results/feedback/design_curves.{png,jsonl}).
#   shared : the paper's layout (argmax head), progressive k=1 -> 2 -> 4 by self-forcing
#   tp     : teacher-preserving layout, inverse-CDF head; its k=1 stage is the teacher's own
#            sampler (exact, nothing to train), so its stage-1 minutes go to k=2
# Stage budgets are CPU-minutes of one thread (training/distill.py clocks process CPU time on a
# CPU); both chains run at once, so a shared core slows both alike. Resumable: rerun to continue.
# Usage: nohup nice -n 19 env OMP_NUM_THREADS=1 taskset -c 0 \
#          experiments/design_curves.sh runs/curves > runs/curves.log 2>&1 &
set -euo pipefail
OUT=${1:-runs/curves}
TEACHER=${TEACHER:-runs/teacher-small}
DATA=${DATA:-.cache/prepared/brown-v8192-s0}
FB=${FB:-runs/fb}                          # the feedback chain's run directories
FIG=${FIG:-docs/results/feedback/design_curves}
PY=${PY:-.venv/bin/python}
K1_MIN=${K1_MIN:-8}; K2_MIN=${K2_MIN:-6}; K4_MIN=${K4_MIN:-6}
EVAL_MIN=${EVAL_MIN:-2}
base=(-m kforcing distill --teacher "$TEACHER" --data "$DATA" --max-k 4 --block-size 64
      --windows 64 --batch-size 16 --tau-min 0.7 --tau-max 1.0 --eval-every-min "$EVAL_MIN"
      --eval-contexts 256 --quiet)

stage() {  # k minutes out [flags]: one stage, skipped once done, resumed when interrupted
  local k=$1 min=$2 out=$3; shift 3
  [ -f "$out/done" ] && return 0
  local resume=()
  [ -f "$out/checkpoints/latest.json" ] && resume=(--resume)
  echo "== $(date +%T) k=$k ${min} CPU-min -> $out"
  "$PY" "${base[@]}" --k "$k" --time-budget-min "$min" --out "$out" "${resume[@]}" "$@"
  touch "$out/done"
}

shared_chain() {
  stage 1 "$K1_MIN" "$OUT/shared/k1" --layout shared
  stage 2 "$K2_MIN" "$OUT/shared/k2" --init "$OUT/shared/k1"
  stage 4 "$K4_MIN" "$OUT/shared/k4" --init "$OUT/shared/k2"
}

tp_chain() {
  local k2_min
  k2_min=$(python3 -c "print($K1_MIN + $K2_MIN)")
  stage 2 "$k2_min" "$OUT/tp/k2" --layout teacher-preserving --head inverse-cdf
  stage 4 "$K4_MIN" "$OUT/tp/k4" --init "$OUT/tp/k2"
}

main() {
  mkdir -p "$OUT"
  shared_chain > "$OUT/shared.log" 2>&1 &
  local a=$!
  tp_chain > "$OUT/tp.log" 2>&1 &
  local b=$!
  wait "$a"; wait "$b"
  "$PY" -m kforcing.evaluation.curves \
    --chain "paper layout (shared)" "$OUT/shared/k1" "$OUT/shared/k2" "$OUT/shared/k4" \
    --chain "teacher-preserving, inverse CDF" "$OUT/tp/k2" "$OUT/tp/k4" \
    --chain "token feedback" "$FB/s1" "$FB/k2" "$FB/k4" \
    --out "$FIG"
  echo "== $(date +%T) done: $FIG.png $FIG.jsonl"
}

main "$@"   # (one function: the whole script is read before it runs, so editing it is safe)
exit
