#!/usr/bin/env bash
# Side measurements of the token-feedback student, after experiments/feedback_chain.sh:
# - the same trained draft sampled through the inverse CDF instead of Gumbel-max (coupling check);
# - a draft vocabulary of the N most frequent train tokens (stage 1 only, same teacher cache):
#   match and speed against the full-vocabulary draft at equal CPU-minutes.
# Usage: experiments/feedback_extra.sh [OUT] [N]   (defaults runs/fb, 2048)
set -euo pipefail
OUT=${1:-runs/fb}; N=${2:-2048}
TEACHER=${TEACHER:-runs/teacher-small}
DATA=${DATA:-.cache/prepared/brown-v8192-s0}
PY=${PY:-.venv/bin/python}
MIN=${MIN:-8}
T=("$PY" -m kforcing distill --design feedback --threads 1)
M="$PY experiments/feedback_measure.py"
resume() { [ -f "$1/checkpoints/latest.json" ] && echo --resume || true; }

$M match --student "$OUT/k4" --data "$DATA" --coupling inverse-cdf \
  --out "$OUT/match-k4-inverse-cdf.json" > /dev/null
V="$OUT/dv$N"
"${T[@]}" --teacher "$TEACHER" --data "$DATA" --k 1 --cache "$OUT/cache" \
  --cache-windows "${WINDOWS:-4096}" --out "$V/s1" --time-budget-min "$MIN" --draft-vocab "$N" \
  --quiet $(resume "$V/s1")
$M match --student "$V/s1" --data "$DATA" --out "$V/match-s1.json" > /dev/null
$M speed --student "$V/s1" --ks 2 4 --out "$V/speed-s1.json" > /dev/null
$M speed --student "$OUT/s1" --ks 2 4 --out "$OUT/speed-s1.json" > /dev/null
echo "done: $V"
