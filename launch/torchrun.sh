#!/usr/bin/env bash
# Launch `dist-cosface train` under torchrun on one node or many.
#
#   launch/torchrun.sh CONFIG.yaml [dotted.key=value ...]
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE  ranks on this node; one per GPU                       [all visible GPUs, else 1]
#   NNODES          number of nodes, or MIN:MAX for an elastic job        [1]
#   MASTER_ADDR     address of the node that hosts the rendezvous (one of the job's nodes),
#                   reachable from every node                             [127.0.0.1]
#   MASTER_PORT     rendezvous port on that node                          [29500]
#   RDZV_ID         job id shared by all nodes of one run                 [dist_cosface]
#   MAX_RESTARTS    times torchrun restarts the workers after a failure   [0]
#   NODE_ADDR       address the other nodes reach this node at
#                                          [the source address of this node's route to MASTER_ADDR]
#   RDZV_CONF       more rendezvous settings, k=v,... (e.g. last_call_timeout=5)       [none]
# Node ranks come from the rendezvous (torchrun's c10d rendezvous ignores a node rank).
# A restarted job resumes from its latest intact checkpoint (checkpoint.resume=auto), re-sharded
# when the number of ranks changed. Each restart round gets a fresh store on a fresh port
# (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): torchrun's shared store keeps the dead round's keys
# and a restarted group can hang on them. See docs/launching.md.
# Network (several nodes, launch/node_net.py): the node whose own address MASTER_ADDR is hosts
# the rendezvous store, the workers publish NODE_ADDR, and gloo binds to the interface holding
# NODE_ADDR unless GLOO_SOCKET_IFNAME is set; torchrun and gloo would guess all three from the
# host name, which often resolves to a loopback address, and then no node hosts the store.
# Set NCCL_SOCKET_IFNAME (e.g. ib0) where NCCL's own choice is wrong; NCCL_DEBUG=INFO prints the
# chosen transport; the process-group timeout is the config key dist.timeout_s.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG.yaml [dotted.key=value ...]" >&2
  exit 2
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
NNODES=${NNODES:-1}
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
  net=$(python "$(dirname "$0")/node_net.py" "$MASTER_ADDR" "$MASTER_PORT")
  read -r node_addr is_host ifname <<<"$net"
  NODE_ADDR=${NODE_ADDR:-$node_addr}
  if [[ -z "${GLOO_SOCKET_IFNAME:-}" && "$ifname" != - ]]; then
    export GLOO_SOCKET_IFNAME=$ifname
  fi
  conf=""
  [[ "$is_host" == - ]] || conf="is_host=$is_host"
  conf=${conf}${RDZV_CONF:+${conf:+,}$RDZV_CONF}  # the user's settings come last and win
  rdzv=(--rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv_id="$RDZV_ID"
    --local_addr="$NODE_ADDR" ${conf:+--rdzv_conf="$conf"})
  echo "launch/torchrun.sh: node address $NODE_ADDR, gloo interface" \
    "${GLOO_SOCKET_IFNAME:-unset}, rendezvous settings: ${conf:-none}" >&2
fi
exec python -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --max-restarts="$MAX_RESTARTS" "${rdzv[@]}" -m dist_cosface.cli train "$@"
