#!/usr/bin/env bash
# Set up (if needed), lint, and run the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check bluesky_jit simulated_devices tests benchmarks profiles
exec .venv/bin/python -m pytest -q "$@"
