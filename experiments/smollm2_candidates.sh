#!/usr/bin/env bash
# Short runs that test issue 16's candidates, one at a time (docs/RESULTS.md, "SmolLM2"): stage
# k=1 of the SmolLM2 feedback draft for 6 CPU-minutes on one thread, then `kforcing match` on
# the same 128 held-out chat windows (tau 1). Needs runs/smollm2, the chat corpus CHAT (made by
# `kforcing data chat ... --out runs/chat`) and .cache/prepared/brown-smollm2 (`kforcing data
# prepare --source brown --tokenizer runs/smollm2/tokenizer.json --out .cache/prepared/brown-smollm2`).
# Usage: OMP_NUM_THREADS=1 taskset -c 0 experiments/smollm2_candidates.sh
set -uo pipefail
KF=${KF:-.venv/bin/kforcing}
CHAT=${CHAT:-runs/chat/568ef6a23fdb}
base=(distill --design feedback --teacher runs/smollm2 --k 1 --max-k 4 --batch-size 8 --lr 2e-3
      --draft-bf16 --cache-bf16 --time-budget-min 6 --eval-every-min 100 --eval-windows 16
      --threads 1 --quiet)
run() { name=$1; shift
  [ -f runs/smol/cand-$name/checkpoints/latest.json ] || \
    $KF "${base[@]}" --out runs/smol/cand-$name "$@" > runs/smol/cand-$name.log 2>&1
  $KF match --student runs/smol/cand-$name --data "$CHAT" --windows 128 --taus 1.0 \
    > runs/smol/match-$name.json 2>> runs/smol/cand-$name.log
  echo "$name done $(date)"
}
mkdir -p runs/smol
CC=(--data "$CHAT" --cache runs/smollm2-fb/teacher-cache --cache-windows 4096)
run base "${CC[@]}" --draft-vocab 8192                                   # chats, 1 block, 8,192
run brown --data .cache/prepared/brown-smollm2 --cache runs/smol/cache-brown512 \
    --cache-windows 512 --draft-vocab 8192                               # Brown instead of chats
run depth2 "${CC[@]}" --draft-vocab 8192 --draft-layers 2                # two draft blocks
run noreg "${CC[@]}" --draft-vocab 8192 --reg-weight 0                   # no feature regression
