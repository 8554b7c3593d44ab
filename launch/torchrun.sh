#!/usr/bin/env bash
# Launch `dist-cosface train` under torchrun on one node or many.
#
#   launch/torchrun.sh CONFIG.yaml [dotted.key=value ...]
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE  ranks on this node; one per GPU                       [all visible GPUs, else 1]
#   NNODES          number of nodes, or MIN:MAX for an elastic job        [1]
#   NODE_RANK       this node's index, 0..NNODES-1 (fixed node counts)    [0]
#   MASTER_ADDR     address of node 0, reachable from every node          [127.0.0.1]
#   MASTER_PORT     rendezvous port on node 0                             [29500]
#   RDZV_ID         job id shared by all nodes of one run                 [dist_cosface]
#   MAX_RESTARTS    times torchrun restarts the workers after a failure   [0]
# A restarted job resumes from its latest intact checkpoint (checkpoint.resume=auto), re-sharded
# when the number of ranks changed. Each restart round gets a fresh store on a fresh port
# (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): torchrun's shared store keeps the dead round's keys
# and a restarted group can hang on them. See docs/launching.md.
# Network (multi-node NCCL): set NCCL_SOCKET_IFNAME (e.g. eth0 or ib0) and GLOO_SOCKET_IFNAME
# to the interface that carries MASTER_ADDR; NCCL_DEBUG=INFO prints the chosen transport;
# the process-group timeout is the config key dist.timeout_s.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG.yaml [dotted.key=value ...]" >&2
  exit 2
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-dist_cosface}
MAX_RESTARTS=${MAX_RESTARTS:-0}
if ! [[ "$NNODES" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]]; then
  echo "$0: NNODES must be N or MIN:MAX (positive integers), got '$NNODES'" >&2
  exit 2
fi
if ! [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]]; then
  echo "$0: MAX_RESTARTS must be a non-negative integer, got '$MAX_RESTARTS'" >&2
  exit 2
fi
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

if [[ "$NNODES" == 1 || "$NNODES" == 1:1 ]]; then
  rdzv=(--standalone)
else
  rdzv=(--rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv_id="$RDZV_ID")
  if [[ "$NNODES" != *:* ]]; then
    rdzv+=(--node_rank="$NODE_RANK")  # elastic jobs get their node ranks from the rendezvous
  fi
fi
exec python -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --max-restarts="$MAX_RESTARTS" "${rdzv[@]}" -m dist_cosface.cli train "$@"
