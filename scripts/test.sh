#!/usr/bin/env bash
# Set up (if needed), lint, and run the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# On CI (as root, with apt-get) install redis-server, so that the queue server test runs
# instead of being skipped.
if [ "${CI:-}" = "true" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    && ! command -v redis-server >/dev/null; then
  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null \
    || echo "test.sh: could not install redis-server; the queue server test is skipped" >&2
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
