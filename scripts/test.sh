#!/usr/bin/env bash
# Set up (if needed), lint, and run the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# CI (as root, with apt-get): a real Chromium for the web view's browser test and
# redis-server for the queue server test; elsewhere each is skipped with the reason.
if [[ "${CI:-}" == "true" && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  missing=()
  command -v chromium >/dev/null || missing+=(chromium chromium-driver)
  command -v redis-server >/dev/null || missing+=(redis-server)
  if (( ${#missing[@]} )); then
    { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; } \
      || echo "test.sh: could not install ${missing[*]}; their tests are skipped" >&2
  fi
fi
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
