#!/usr/bin/env bash
# Set up (if needed) and run the demo; extra arguments go to `bluesky-jit demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/bluesky-jit demo --summary demo_output/summary.json --figures demo_output "$@"
