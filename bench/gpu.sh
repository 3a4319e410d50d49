#!/usr/bin/env bash
# The GPU benchmark, as one short script for a lent GPU machine (under 4 minutes):
#   bash bench/gpu.sh            # tables on stdout, JSON in $OUT/gpu-bench.json
# It runs on that machine's own Python and torch (not this repo's venv; $PYTHON, default python3);
# bench/gpu.py says what it times and how. Extra arguments go to bench/gpu.py (e.g. --models resnet50 --budget-s 120).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt" || true
# The budget counts from this script's start (SECONDS): gpu.py stops starting work at 215 s and
# writes its JSON after every model; the timeout at 235 s is the backstop.
timeout $((235 - SECONDS)) "${PYTHON:-python3}" bench/gpu.py --budget-s $((215 - SECONDS)) --out "$OUT/gpu-bench.json" "$@"
status=$?
[ -f "$OUT/gpu-bench.json" ] && echo "json: $OUT/gpu-bench.json"
exit $status
