#!/usr/bin/env bash
# Launch `dist-cosface train` under torchrun on one node or many.
#
#   launch/torchrun.sh CONFIG.yaml [dotted.key=value ...]
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE  ranks on this node; one per GPU                       [all visible GPUs, else 1]
#   NNODES          number of nodes                                       [1]
#   NODE_RANK       this node's index, 0..NNODES-1                        [0]
#   MASTER_ADDR     address of node 0, reachable from every node          [127.0.0.1]
#   MASTER_PORT     rendezvous port on node 0                             [29500]
#   RDZV_ID         job id shared by all nodes of one run                 [dist_cosface]
# Network (multi-node NCCL): set NCCL_SOCKET_IFNAME (e.g. eth0 or ib0) and GLOO_SOCKET_IFNAME
# to the interface that carries MASTER_ADDR; NCCL_DEBUG=INFO prints the chosen transport;
# the process-group timeout is the config key dist.timeout_s. See docs/launching.md.
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

if [[ "$NNODES" == 1 ]]; then
  rdzv=(--standalone)
else
  rdzv=(--rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv_id="$RDZV_ID"
        --node_rank="$NODE_RANK")
fi
exec python -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  "${rdzv[@]}" -m dist_cosface.cli train "$@"
