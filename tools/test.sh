#!/usr/bin/env bash
# The project's test command: installs what the tests need, then runs lint and the whole suite.
#   bash tools/test.sh [pytest args ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash tools/install.sh test
# The Prometheus integration test starts its own server on free loopback ports.
"$PY" -m ruff check dist_cosface tests tools
"$PY" -m ruff format --check dist_cosface tests tools
"$PY" -m pytest -q "$@"
