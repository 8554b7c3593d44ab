#!/usr/bin/env bash
# Idempotent set-up used by launch/quickstart.sh and tools/test.sh.
#   tools/install.sh run    torch (CPU build if none is installed) + dist_cosface
#   tools/install.sh test   the above + DeepSpeed, DALI, onnx, test tools, Prometheus server
# torch goes first so that the project's "torch>=2.1" is already satisfied and pip never pulls
# a multi-GB CUDA build as a dependency. Set TORCH_SPEC to choose another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=${1:-run}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  # 2.13.0 is the CPU build this project is developed and tested with.
  pip_install "${TORCH_SPEC:-torch==2.13.0}"
fi

extras=""
if [[ "$MODE" == test ]]; then
  extras="[test,deepspeed,dali-cu12]"
fi
# Checked from / : inside the checkout its own source folder would pass for an install.
ROOT=$PWD
if [[ -n "$extras" ]] || ! (cd / && "$PY" "$ROOT/tools/install_check.py" "$ROOT" 2>/dev/null); then
  pip_install -e ".${extras}"
fi

if [[ "$MODE" == test ]] && ! command -v promtool >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  else
    echo "install.sh: the Prometheus server is missing; run as root or: sudo apt-get install prometheus" >&2
  fi
fi

# iproute2's ip: tests/test_launch_multinode.py makes two network namespaces (as root)
if [[ "$MODE" == test ]] && ! command -v ip >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
  else
    echo "install.sh: ip is missing (the two-node test skips); run as root or: sudo apt-get install iproute2" >&2
  fi
fi
