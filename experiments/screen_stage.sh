#!/usr/bin/env bash
# Screening runs for the distillation design options (issue: K-Forcing core). Each option gets
# the same training-time budget and differs from the paper's configuration in one setting.
# Usage: experiments/screen_stage.sh MINUTES NAME [NAME ...]   (runs sequentially)
# Results: runs/screen/<NAME>/metrics.jsonl; plot with `kforcing curves runs/screen/* --out ...`
set -euo pipefail
MIN=${1:?minutes per run}; shift
TEACHER=${TEACHER:-runs/teacher-small}
DATA=${DATA:-.cache/prepared/brown-v8192-s0}
KF=${KF:-.venv/bin/kforcing}
base=(--teacher "$TEACHER" --data "$DATA" --max-k 4 --time-budget-min "$MIN"
      --block-size 64 --windows 64 --batch-size 16 --eval-every-min 1 --eval-contexts 64 --quiet
      --tau-min 1.0 --tau-max 1.0)   # the paper trains at tau = 1; options override below
for name in "$@"; do
  out=runs/screen/$name
  case $name in
    paper)        args=(--k 1) ;;                                   # shared, argmax, vocab, tau 1
    sorted)       args=(--k 1 --cdf-order sorted) ;;
    tau-range)    args=(--k 1 --tau-min 0.7 --tau-max 1.0) ;;
    inversion)    args=(--k 1 --target noise-inversion) ;;
    high-lr)      args=(--k 1 --lr 1e-3 --noise-lr 1e-2) ;;
    low-lr)       args=(--k 1 --lr 2e-4 --noise-lr 5e-4) ;;
    tp-argmax)    args=(--k 1 --layout teacher-preserving) ;;
    tau-curric)   args=(--k 1 --tau-start 0.2 --tau-ramp 0.5) ;;
    tp-tau-range) args=(--k 1 --layout teacher-preserving --tau-min 0.7 --tau-max 1.0) ;;
    tp-icdf-k2)   args=(--k 2 --layout teacher-preserving --head inverse-cdf --cdf-order sorted) ;;
    *) echo "unknown option $name" >&2; exit 2 ;;
  esac
  if [ -f "$out/checkpoints/latest.json" ]; then resume=(--resume); else resume=(); fi
  echo "== $name: ${args[*]}"
  "$KF" distill "${base[@]}" "${args[@]}" --out "$out" "${resume[@]}"
done
