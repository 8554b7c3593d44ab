#!/usr/bin/env bash
# Every GPU check of the project in one short run (they all skip cleanly on CPU machines).
#   bash tools/gpu_checks.sh [OUT_DIR]
# Writes gpu_tests.log (and the device facts) into OUT_DIR (default: runs/gpu_checks).
# The DALI GPU tests also need nvidia-dali installed; they skip with a reason otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-runs/gpu_checks}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT_DIR/device.txt"
PYTHONPATH=. PYTHONUNBUFFERED=1 "$PY" -m pytest -m gpu -q -s -rs -p no:cacheprovider \
  tests/test_classifier.py tests/test_engine_gpu.py tests/test_eval_sets.py \
  tests/test_metrics.py tests/test_data_gpu.py 2>&1 | tee "$OUT_DIR/gpu_tests.log"
exit "${PIPESTATUS[0]}"
