#!/usr/bin/env bash
# The GPU benchmark, as one short script for a lent GPU machine (under 4 minutes):
#   bash bench/gpu.sh            # tables on stdout, JSON in $OUT/gpu-bench.json
# It runs on that machine's own Python and torch (not this repo's venv); bench/gpu.py says what it
# times and how. Extra arguments go to bench/gpu.py (e.g. --models resnet50 --budget-s 120).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt" || true
python3 - <<'PY'
import importlib.util, platform, sys
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cpus", __import__("os").cpu_count())
have = [m for m in ("torchvision", "onnx", "onnxruntime", "tensorrt", "triton", "pydantic", "pytest")
        if importlib.util.find_spec(m)]
print("importable:", " ".join(have))
PY
# gpu.py stops starting work after --budget-s (215 s); the timeout is the backstop, so that the
# partial JSON (written after each model) still comes back.
timeout 235 python3 bench/gpu.py --budget-s 215 --out "$OUT/gpu-bench.json" "$@"
status=$?
[ -f "$OUT/gpu-bench.json" ] && echo "json: $OUT/gpu-bench.json"
exit $status
