#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with the pinned requirements.
#   bash tools/setup.sh         runtime only (enough to run the dashboard)
#   bash tools/setup.sh --dev   also pytest, Playwright and Debian's chromium for browser tests
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  if ! command -v chromium >/dev/null 2>&1; then
    # Playwright drives Debian's chromium; it never downloads a browser of its own.
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
else
  .venv/bin/python -m pip install --quiet -r requirements.txt
fi
