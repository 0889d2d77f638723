#!/usr/bin/env bash
# Create .venv and install bluesky_jit with its test extras (idempotent).
# torch==2.13.0 is installed first: a bare "torch" requirement would pull
# several GB of CUDA wheels from the registry on a CPU-only machine.
# The install is skipped when pyproject.toml and this script are unchanged
# since the last one that succeeded (FORCE_INSTALL=1 redoes it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS="test,astra,kafka,export,queue"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.bluesky-jit-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -z "${FORCE_INSTALL:-}" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && .venv/bin/python -c "import bluesky_jit" 2>/dev/null; then
  echo "setup: .venv is up to date (FORCE_INSTALL=1 bash scripts/setup.sh reinstalls)"
  exit 0
fi
rm -f "$stamp"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
echo "$want" > "$stamp"
