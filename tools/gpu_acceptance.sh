#!/usr/bin/env bash
# GPU acceptance for Transfer Lab: run on a machine with 1-8 NVIDIA GPUs and the CUDA build of
# TensorFlow (README, "GPU servers"). One verdict line per check; exit status 1 if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
fi
exec "$PYTHON" bench/gpu_acceptance.py "$@"
