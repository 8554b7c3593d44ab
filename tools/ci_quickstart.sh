#!/usr/bin/env bash
# The README's first command as a new user runs it: `bash launch/quickstart.sh` in a fresh
# virtualenv that holds nothing but torch (pip's cache and local wheels may serve it), so an
# install step the quickstart forgets fails CI. The quickstart exits 0 even when its
# evaluation or a plot fails (a finished run is kept), so the run folder is checked as well.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
# only the venv: no PYTHONPATH, no user site-packages
env -u PYTHONPATH -u PYTHON PYTHONNOUSERSITE=1 PATH="$work/venv/bin:$PATH" VIRTUAL_ENV="$work/venv" \
  QUICKSTART_OUT="$work/quickstart" bash launch/quickstart.sh
"$work/venv/bin/python" tools/check_run.py "$work/quickstart/run" --png training.png
