#!/usr/bin/env bash
# Create .venv and install bluesky_jit with its test extras (idempotent).
# torch==2.13.0 is installed first: a bare "torch" requirement would pull
# several GB of CUDA wheels from the registry on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test,astra,kafka,queue]"
