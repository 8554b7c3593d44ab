#!/usr/bin/env bash
# The project's GPU checks in one run that fits scarce GPU time: the default finishes in under
# 8 minutes (GPU_CHECKS_BUDGET_S, default 420 s of steps), most important first. Each step's
# output and status is recorded; a failing step never stops the others; a step that would
# overrun the budget gets the time left (or is skipped, "out of time budget").
#   bash tools/gpu_checks.sh [OUT_DIR]     (default OUT_DIR: $OUT if set, else runs/gpu_checks)
# Runs from the checkout with the machine's own torch (>= 2.11) and triton (>= 3.6): no pip,
# no network (PYTHONPATH is set to the checkout here).
# Default steps, in order (GPU_CHECKS_STEPS="..." selects others; limits in seconds below):
#   device      GPU / driver / torch / triton versions                   -> device.txt
#   triton      the Triton head on CUDA against the float64 reference    -> triton_tests.log
#               (every margin x fp32/bf16/fp16 x full/Partial FC; pytest if installed)
#   bench2m     head, torch vs triton, C=2M  D=512 N=1024 bf16          -> bench_classifier_2m.{txt,json}
#   bench10m    head, torch vs triton, C=10M D=512 N=1024 bf16          -> bench_classifier_10m.{txt,json}
#   train       iResNet-50 112x112 bf16 channels_last, eager vs compile  -> bench_train.{txt,json}
# Optional steps (not in the default): tests (every @pytest.mark.gpu test), dali_cpu, dali_mixed
# (DALI decoding img/s; DALI's wheel is not on a bare GPU machine: docs/data.md).
# summary.txt / summary.json list every step with its status (ok, failed rc=N, skipped: why).
# Without CUDA every GPU step is skipped with that reason and the summary is still written.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu_checks}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STEPS=${GPU_CHECKS_STEPS:-"device triton bench2m bench10m train"}
BUDGET=${GPU_CHECKS_BUDGET_S:-420}
SUMMARY="$OUT_DIR/summary.tsv"
: >"$SUMMARY"

record() { # name status seconds files
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"
  echo "== $1: $2 (${3}s)"
}

selected() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

run_step() { # name limit_s log_file command...
  local name=$1 limit=$2 log=$3
  shift 3
  if ! selected "$name"; then record "$name" "skipped: not selected" 0 ""; return; fi
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 30 ]; then record "$name" "skipped: out of time budget" 0 ""; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS rc
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT_DIR/$log" 2>&1
  rc=$?
  local status=ok
  if [ "$rc" -eq 124 ]; then status="failed: timed out after ${limit}s"; elif [ "$rc" -ne 0 ]; then status="failed rc=$rc"; fi
  record "$name" "$status" $((SECONDS - start)) "$log"
}

skip_step() { # name reason
  if selected "$1"; then record "$1" "skipped: $2" 0 ""; else record "$1" "skipped: not selected" 0 ""; fi
}

device_facts() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("triton", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001
        print(name, "not importable:", type(exc).__name__)
EOF
}

# the Triton head on CUDA: through pytest when the machine has it, else the same cases directly
triton_tests() {
  if "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_classifier_triton.py \
      tests/test_health.py -k triton
  else
    echo "pytest is not installed: running tests/triton_interp_cases.py cuda directly"
    "$PY" -m tests.triton_interp_cases cuda
  fi
}

HAS_CUDA=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && HAS_CUDA=1
HAS_DALI=0  # looked for only when a DALI step is selected (importing it takes seconds)
if [ "$HAS_CUDA" = 1 ] && { selected dali_cpu || selected dali_mixed; }; then
  "$PY" -c "import nvidia.dali" 2>/dev/null && HAS_DALI=1
fi

export PY
export -f device_facts triton_tests
run_step device 30 device.txt bash -c device_facts
BENCH=(tools/bench_classifier.py --device cuda --world-size 1 --dim 512 --batch 1024
  --dtype bfloat16 --impls torch,triton)
if [ "$HAS_CUDA" = 1 ]; then
  run_step triton 150 triton_tests.log bash -c triton_tests
  run_step bench2m 100 bench_classifier_2m.txt "$PY" "${BENCH[@]}" --num-classes 2000000 \
    --iters 5 --json "$OUT_DIR/bench_classifier_2m.json"
  run_step bench10m 130 bench_classifier_10m.txt "$PY" "${BENCH[@]}" --num-classes 10000000 \
    --iters 3 --json "$OUT_DIR/bench_classifier_10m.json"
  # the backbone's speed alone: the head stays on the torch kernels here
  run_step train 150 bench_train.txt "$PY" tools/bench_train_gpu.py --model iresnet50 \
    --image-size 112 --batch 256 --kernel torch --steps 20 --warmup 3 --variants eager,compile \
    --json "$OUT_DIR/bench_train.json"
  run_step tests 600 gpu_tests.log "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests
else
  for s in triton bench2m bench10m train tests; do skip_step "$s" "no CUDA device"; done
fi
if [ "$HAS_CUDA" = 1 ] && [ "$HAS_DALI" = 1 ]; then
  DATA=(tools/bench_data.py --images 51200 --batch-size 256 --workers 12 --image-size 112
    --backends dali --batches 150)
  run_step dali_cpu 300 bench_dali_cpu.txt "$PY" "${DATA[@]}" --dali-device cpu
  run_step dali_mixed 300 bench_dali_mixed.txt "$PY" "${DATA[@]}" --dali-device mixed
elif [ "$HAS_CUDA" = 1 ]; then
  for s in dali_cpu dali_mixed; do skip_step "$s" "nvidia.dali does not import (docs/data.md)"; done
else
  for s in dali_cpu dali_mixed; do skip_step "$s" "no CUDA device"; done
fi

"$PY" - "$SUMMARY" "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path
rows = [line.split("\t") for line in Path(sys.argv[1]).read_text().splitlines() if line]
steps = [{"step": r[0], "status": r[1], "seconds": int(r[2]), "log": r[3]} for r in rows]
out = Path(sys.argv[2])
(out / "summary.json").write_text(json.dumps({"steps": steps}, indent=2) + "\n")
lines = [f"{s['step']:<12}{s['status']:<50}{s['seconds']:>6}s  {s['log']}" for s in steps]
(out / "summary.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
# exit status: failed steps (skips are not failures)
! grep -q $'\tfailed' "$SUMMARY"
