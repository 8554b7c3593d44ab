#!/usr/bin/env bash
# CPU quickstart: no GPU, no arguments, no downloads.
# Installs what is missing, trains 2 ranks over gloo on synthetic identities
# (configs/quickstart.yaml), evaluates verification on synthetic identities never seen in
# training, and exits 0. Extra arguments are passed on as config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash tools/install.sh run

OUT=${QUICKSTART_OUT:-runs/quickstart}
# Each quickstart is a fresh run (a kept folder would be resumed at its last step).
rm -rf "$OUT" && mkdir -p "$OUT"
"$PY" -m dist_cosface.cli synthetic-pairs configs/quickstart.yaml "$OUT/unseen_pairs.bin"
# --standalone picks a free rendezvous port, so two quickstarts never collide.
"$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m dist_cosface.cli train \
  configs/quickstart.yaml train.output_dir="$OUT" "eval.targets=[$OUT/unseen_pairs.bin]" "$@"
echo "quickstart: done; run folder $OUT (config.yaml, metrics.jsonl, checkpoints/, eval.json)"
