#!/usr/bin/env bash
# Launch `dist-cosface train` with the DeepSpeed launcher (backbone under a DeepSpeed engine).
#
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh CONFIG.yaml [dotted.key=value ...]
#
# The hostfile lists one node per line as "hostname slots=GPUS"; the launcher reaches the other
# nodes by passwordless ssh. Without HOSTFILE it runs on this node only. train.engine=deepspeed
# is set here; ZeRO stage and precision come from train.zero_stage / train.precision.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG.yaml [dotted.key=value ...]" >&2
  exit 2
fi
if [[ "${MAX_RESTARTS:-0}" != 0 || "${NNODES:-}" == *:* ]]; then
  # the DeepSpeed launcher has no restart loop: torchrun runs the same engine with restarts
  echo "$0: MAX_RESTARTS / elastic NNODES need launch/torchrun.sh ... train.engine=deepspeed" >&2
  exit 2
fi
args=()
if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile "$HOSTFILE")
fi
if [[ -n "${NUM_GPUS:-}" ]]; then
  args+=(--num_gpus "$NUM_GPUS")
fi
MASTER_PORT=${MASTER_PORT:-29500}
# --no_local_rank: the rank comes from the LOCAL_RANK variable the launcher sets, not argv.
exec deepspeed "${args[@]}" --master_port "$MASTER_PORT" --no_local_rank --module dist_cosface.cli \
  train "$@" train.engine=deepspeed
