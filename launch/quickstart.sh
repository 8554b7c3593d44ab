#!/usr/bin/env bash
# CPU quickstart: no GPU, no arguments, no downloads. The real data path at a small scale:
#   1. generate face-like JPEGs in identity folders (64 training identities, 40 unseen ones)
#   2. convert the training folder to WebDataset shards with `dist-cosface shards`
#   3. train 2 ranks over gloo reading those shards (DALI on the CPU when nvidia.dali imports,
#      webdataset otherwise), configs/quickstart.yaml
#   4. evaluate verification on pairs of the unseen identities; plot the run
# Extra arguments are passed to `dist-cosface train` as config overrides.
# QUICKSTART_OUT (default runs/quickstart) chooses the folder; it is recreated on every run.
# Two quickstarts in different folders run side by side: torchrun --standalone picks a free
# rendezvous port and metrics.port 0 gives every rank a free /metrics port (logged).
set -euo pipefail
OUT=$(realpath -m "${QUICKSTART_OUT:-$(dirname "$0")/../runs/quickstart}")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash tools/install.sh run

# Recreate the folder, but never delete one that a quickstart did not make.
if [[ -e "$OUT" && ! -e "$OUT/.quickstart" && -n "$(ls -A "$OUT")" ]]; then
  echo "quickstart: $OUT exists and is not a quickstart folder; set QUICKSTART_OUT" >&2
  exit 2
fi
rm -rf "$OUT" && mkdir -p "$OUT" && touch "$OUT/.quickstart"
CLI=("$PY" -m dist_cosface.cli)
# Independent set-up steps run two at a time (each is one single-threaded process);
# `wait PID` returns the background step's status, so set -e stops on its failure too.
"${CLI[@]}" synthetic-faces "$OUT/faces/train" --identities 64 --images-per-identity 32 \
  --image-size 32 &
faces=$!
"${CLI[@]}" synthetic-faces "$OUT/faces/unseen" --identities 40 --images-per-identity 6 \
  --first-identity 64 --image-size 32
wait "$faces"
"$PY" tools/make_pairs.py "$OUT/faces/unseen" "$OUT/unseen_pairs.bin" --num-pairs 400 &
pairs=$!
"${CLI[@]}" shards "$OUT/faces/train" "$OUT/shards" --shard-size 512 --no-progress
wait "$pairs"

if "$PY" -c "import nvidia.dali" 2>/dev/null; then
  BACKEND=dali
  echo "quickstart: loader: DALI, decoding on the CPU (nvidia.dali is installed)"
else
  BACKEND=webdataset
  echo "quickstart: loader: webdataset (nvidia.dali is not installed; pip install -e '.[dali-cu12]')"
fi
RUN="$OUT/run"
"$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m dist_cosface.cli train \
  configs/quickstart.yaml data.backend=$BACKEND data.path="$OUT/shards" \
  train.output_dir="$RUN" "eval.targets=[$OUT/unseen_pairs.bin]" "$@"

# A chart that cannot be drawn must not fail a finished run.
"$PY" tools/plot_run.py --metrics-log "$RUN/metrics.jsonl" --out "$RUN/training.png" \
  >/dev/null || echo "quickstart: warning: training chart not written" >&2
plots=$(ls "$RUN"/*.png 2>/dev/null | xargs || true)
cat <<EOF
quickstart: done in ${SECONDS} s
  run folder   $RUN (config.yaml, checkpoints/)
  metrics      $RUN/metrics.jsonl
  evaluation   $RUN/eval.json (pairs of 40 identities never seen in training)
  plots        ${plots:-none (see the warnings above)}
  data         $OUT/faces (JPEG folders), $OUT/shards (shards, indexes, manifest.json)
EOF
