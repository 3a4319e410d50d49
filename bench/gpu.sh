#!/usr/bin/env bash
# The GPU benchmark, as one short script for a lent GPU machine (under 4 minutes):
#   bash bench/gpu.sh            # table on stdout, JSON in $OUT/gpu-bench.json
# It runs on that machine's own Python and torch; see bench/gpu.py for the variants.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt" || true
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
# Stop before the session's 4-minute budget so the partial JSON (written after each model) comes back.
timeout 225 python3 bench/gpu.py --out "$OUT/gpu-bench.json" "$@"
status=$?
[ -f "$OUT/gpu-bench.json" ] && echo "json: $OUT/gpu-bench.json"
exit $status
