#!/usr/bin/env bash
# SmolLM2-135M-Instruct -> K-Forcing student, k=1 then k=2, on a CPU (docs/TEACHERS.md).
# Usage: experiments/smollm2_distill.sh STAGE1_MIN K2_MIN [OUT]
#   full run (the lead launches it):  experiments/smollm2_distill.sh 20 40 runs/smollm2-kf
#   smoke test:                       experiments/smollm2_distill.sh 1 1 runs/smollm2-smoke
# Env: TEACHER (default runs/smollm2, made by `kforcing import`), DATA (prepared corpus in the
# teacher's tokenizer; made from Brown when missing), DATA_FREE=1 to distill on teacher samples,
# CORES (taskset list, default 1), EXTRA (more distill flags), KF (the kforcing command).
# Each stage resumes when re-run with the same OUT.
set -euo pipefail
M1=${1:?stage-1 minutes}; M2=${2:?k=2 minutes}; OUT=${3:-runs/smollm2-kf}
TEACHER=${TEACHER:-runs/smollm2}
DATA=${DATA:-.cache/prepared/brown-smollm2}
KF=${KF:-.venv/bin/kforcing}
CORES=${CORES:-1}
run() { OMP_NUM_THREADS=1 taskset -c "$CORES" "$@"; }
mkdir -p "$OUT"

if [ ! -f "$TEACHER/config.json" ]; then
  run "$KF" import "$(run "$KF" fetch smollm2)" --out "$TEACHER"
fi
if [ "${DATA_FREE:-0}" = 1 ]; then
  data=(--data-free --data-free-tokens "${DATA_FREE_TOKENS:-65536}")
  # held-out contexts for `kforcing match`: the cached teacher samples
  match_data() { dirname "$(ls -d "$OUT"/teacher-samples/*/train.bin | head -1)"; }
else
  if [ ! -f "$DATA/corpus.json" ]; then
    run "$KF" data prepare --source brown --tokenizer "$TEACHER/tokenizer.json" --out "$DATA"
  fi
  data=(--data "$DATA")
  match_data() { echo "$DATA"; }
fi

# 30 blocks x 576 wide: train the last 8 blocks on 64-token contexts, 32 windows per context
base=(--teacher "$TEACHER" "${data[@]}" --max-k 2 --block-size 64 --windows 32 --batch-size 4
      --train-last-blocks 8 --eval-every-min 5 --eval-contexts 64 --ckpt-every 50 --quiet)
# shellcheck disable=SC2086
stage() {  # k minutes out [init]
  local resume=(); [ -f "$3/checkpoints/latest.json" ] && resume=(--resume)
  local init=(); [ -n "${4:-}" ] && init=(--init "$4")
  echo "== k=$1, $2 min -> $3" >&2
  run "$KF" distill "${base[@]}" --k "$1" --time-budget-min "$2" --out "$3" "${init[@]}" \
    "${resume[@]}" ${EXTRA:-}
}
match() {  # student k label
  run "$KF" match --student "$1" --data "$(match_data)" --k "$2" --windows 256 \
    --block-size 64 --taus 1.0,0.7 | tee -a "$OUT/match.jsonl" |
    python3 -c "import json,sys; r=json.load(sys.stdin); print('$3', {t: (v['first'], v['joint']) for t, v in r.items() if t.startswith('tau')})"
}

stage 1 "$M1" "$OUT/k1"
match "$OUT/k1" 1 "k=1 after stage 1 (first, joint):"
match "$OUT/k1" 2 "k=2 BEFORE the k=2 stage:"
stage 2 "$M2" "$OUT/k2" "$OUT/k1"
match "$OUT/k2" 2 "k=2 AFTER the k=2 stage:"
run "$KF" curves "$OUT/k1" "$OUT/k2" --out "$OUT/curves_joint.png" --metric joint \
  --title "SmolLM2-135M -> K-Forcing (CPU)" > "$OUT/curves.json"
run "$KF" save "$OUT/k2" --out "$OUT/shared"
echo "learning curves: $OUT/curves_joint.png; match: $OUT/match.jsonl; shareable: $OUT/shared"
