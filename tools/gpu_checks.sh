#!/usr/bin/env bash
# Every GPU check of the project in one run; each step's output and exit status is recorded
# and a failing step never stops the others.
#   bash tools/gpu_checks.sh [OUT_DIR]          (default OUT_DIR: runs/gpu_checks)
# Steps (select with GPU_CHECKS_STEPS="tests bench2m ..."; per-step timeouts in seconds below):
#   device    GPU / driver / torch / triton / DALI versions             -> device.txt
#   tests     every @pytest.mark.gpu test (skips cleanly without CUDA)  -> gpu_tests.log
#   bench2m   classifier torch vs triton, C=2M  D=512 N=1024 bf16       -> bench_classifier_2m.{txt,json}
#   bench10m  classifier torch vs triton, C=10M D=512 N=1024 bf16       -> bench_classifier_10m.{txt,json}
#   train     iResNet-50 112x112 bf16 channels_last, eager vs compile   -> bench_train.{txt,json}
#   dali_cpu, dali_mixed  DALI decoding img/s at 112x112 (if DALI imports) -> bench_dali_*.txt
# summary.txt / summary.json list every step with its status (ok, failed rc=N, skipped: why).
# Without CUDA every GPU step is skipped with that reason and the summary is still written.
# DALI on an offline GPU machine: see docs/classifier.md ("GPU checks"), tools/split_wheel.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-runs/gpu_checks}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STEPS=${GPU_CHECKS_STEPS:-"device tests bench2m bench10m train dali_cpu dali_mixed"}
SUMMARY="$OUT_DIR/summary.tsv"
: >"$SUMMARY"

record() { # name status seconds files
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"
  echo "== $1: $2 (${3}s)"
}

run_step() { # name timeout_s log_file command...
  local name=$1 limit=$2 log=$3
  shift 3
  case " $STEPS " in *" $name "*) ;; *) record "$name" "skipped: not selected" 0 ""; return ;; esac
  local start=$SECONDS rc
  timeout --signal=TERM --kill-after=30 "$limit" "$@" >"$OUT_DIR/$log" 2>&1
  rc=$?
  local status=ok
  if [ "$rc" -eq 124 ]; then status="failed: timed out after ${limit}s"; elif [ "$rc" -ne 0 ]; then status="failed rc=$rc"; fi
  record "$name" "$status" $((SECONDS - start)) "$log"
}

skip_step() { # name reason
  case " $STEPS " in *" $1 "*) record "$1" "skipped: $2" 0 "" ;; *) record "$1" "skipped: not selected" 0 "" ;; esac
}

device_facts() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("triton", "nvidia.dali"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001
        print(name, "not importable:", type(exc).__name__)
EOF
}

HAS_CUDA=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && HAS_CUDA=1
HAS_DALI=0
"$PY" -c "import nvidia.dali" 2>/dev/null && HAS_DALI=1

export PY
export -f device_facts
run_step device 120 device.txt bash -c device_facts
# all GPU tests, also on CPU machines (they must skip cleanly there)
run_step tests 1200 gpu_tests.log "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests
BENCH=(tools/bench_classifier.py --device cuda --world-size 1 --dim 512 --batch 1024
  --dtype bfloat16 --impls torch,triton --iters 5)
if [ "$HAS_CUDA" = 1 ]; then
  run_step bench2m 600 bench_classifier_2m.txt "$PY" "${BENCH[@]}" --num-classes 2000000 \
    --json "$OUT_DIR/bench_classifier_2m.json"
  run_step bench10m 900 bench_classifier_10m.txt "$PY" "${BENCH[@]}" --num-classes 10000000 \
    --json "$OUT_DIR/bench_classifier_10m.json"
  run_step train 900 bench_train.txt "$PY" tools/bench_train_gpu.py --model iresnet50 \
    --image-size 112 --batch 256 --variants eager,compile --json "$OUT_DIR/bench_train.json"
else
  for s in bench2m bench10m train; do skip_step "$s" "no CUDA device"; done
fi
if [ "$HAS_CUDA" = 1 ] && [ "$HAS_DALI" = 1 ]; then
  DATA=(tools/bench_data.py --images 51200 --batch-size 256 --workers 12 --image-size 112
    --backends dali --batches 150)
  run_step dali_cpu 600 bench_dali_cpu.txt "$PY" "${DATA[@]}" --dali-device cpu
  run_step dali_mixed 600 bench_dali_mixed.txt "$PY" "${DATA[@]}" --dali-device mixed
elif [ "$HAS_CUDA" = 1 ]; then
  for s in dali_cpu dali_mixed; do
    skip_step "$s" "nvidia.dali does not import (install: docs/classifier.md, GPU checks)"
  done
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
