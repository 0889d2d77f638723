#!/usr/bin/env bash
# Set up (if needed), lint, and run the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# CI: a real Chromium for the web view's browser test (skipped, with the reason, where none is)
if [[ "${CI:-}" == "true" && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null \
    && ! command -v chromium >/dev/null; then
    apt-get update -q && apt-get install -y -q chromium chromium-driver
fi
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
