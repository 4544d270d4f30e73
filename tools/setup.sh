#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with the pinned requirements.
#   bash tools/setup.sh         runtime only (enough to run the dashboard)
#   bash tools/setup.sh --dev   also pytest, Playwright and Debian's chromium for browser tests
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# uv (from PyPI) installs the pinned wheels several times faster than pip; pip stays in the venv for users.
# --compile-bytecode writes the .pyc files at install, as pip does and uv does not by default: where
# PYTHONDONTWRITEBYTECODE is set, nothing writes them later, and every process then compiles TensorFlow
# from source as it imports it (14 s of CPU per import here instead of 5).
.venv/bin/python -m pip install --quiet uv==0.13.8
install() { .venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python -r "$1"; }
if [ "${1:-}" = "--dev" ]; then
  install requirements-dev.txt
  if ! command -v chromium >/dev/null 2>&1; then
    # Playwright drives Debian's chromium; it never downloads a browser of its own.
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
else
  install requirements.txt
fi
