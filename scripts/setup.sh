#!/usr/bin/env bash
# Creates ./.venv (if missing) with torch (CPU) and the build tools, then builds and installs
# seft_ext from this checkout. Idempotent; used by scripts/test.sh, scripts/run.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${SEFT_TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "$TORCH_SPEC"
python -m pip install -q "scikit-build-core>=0.10" ninja "cmake>=3.25" pytest hypothesis numpy "transformers>=4.50" accelerate \
  safetensors "peft>=0.17" ruff
# Build against the torch installed above (no isolated build env: it would fetch another torch).
python -m pip install -q --no-build-isolation --no-deps --force-reinstall .
python -m seft_ext
