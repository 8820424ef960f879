#!/usr/bin/env bash
# Steady-state `--k auto` serving (docs/RESULTS.md, "Serving"): one server, a learning pass over
# every cell, then the measured passes in interleaved rounds. Outputs under runs/quiet/.
set -x
K=${KFORCING:-kforcing}
export OMP_NUM_THREADS=1
cd "$(dirname "$0")/.." && mkdir -p runs/quiet
taskset -c 1 $K serve --model runs/fb/k4 --k auto --max-batch 128 --port 8123 --log-level info > runs/quiet/serve-steady-server.log 2>&1 &
SP=$!
for i in $(seq 1 600); do curl -sf http://127.0.0.1:8123/health >/dev/null && break; sleep 1; done
U=http://127.0.0.1:8123
taskset -c 1 $K bench-serve --url $U --modes ar,kforcing,lossless --concurrency 1,4,32,128 --requests 256 --max-tokens 48 --rounds 2 --out runs/quiet/serve-learn.json
taskset -c 1 $K bench-serve --url $U --modes ar,kforcing,lossless --concurrency 1,4 --requests 128 --max-tokens 48 --rounds 4 --out runs/quiet/serve-steady-a.json
taskset -c 1 $K bench-serve --url $U --modes ar,kforcing,lossless --concurrency 32,128 --requests 1000 --max-tokens 48 --rounds 4 --out runs/quiet/serve-steady-b.json
curl -s $U/health > runs/quiet/serve-steady-health.json
kill -TERM $SP; wait $SP
